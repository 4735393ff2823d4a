/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Never loaded: instantiates every type shared with user space so that its
 * layout, and every enum's values, land in this object's BTF. The Rust test
 * tests/abi.rs compares them with the #[repr(C)] mirrors in src/abi.rs
 * (the idea of Cilium's bpf_alignchecker.c).
 */
#include "lib/pipeline.h"
#include "lib/clock.h"

#define MG_ABI(type, name) type name __attribute__((used)) SEC(".abi")

MG_ABI(struct mg_config, abi_config);
MG_ABI(struct mg_endpoint, abi_endpoint);
MG_ABI(struct mg_ipcache_key, abi_ipcache_key);
MG_ABI(struct mg_ipcache_value, abi_ipcache_value);
MG_ABI(struct mg_policy_key, abi_policy_key);
MG_ABI(struct mg_policy_value, abi_policy_value);
MG_ABI(struct mg_subject_key, abi_subject_key);
MG_ABI(struct mg_subject_value, abi_subject_value);
MG_ABI(struct mg_auth_key, abi_auth_key);
MG_ABI(struct mg_auth_value, abi_auth_value);
MG_ABI(struct mg_ct_key, abi_ct_key);
MG_ABI(struct mg_ct_entry, abi_ct_entry);
MG_ABI(struct mg_frag_key, abi_frag_key);
MG_ABI(struct mg_frag_value, abi_frag_value);
MG_ABI(struct mg_event, abi_event);
MG_ABI(struct mg_auth_signal, abi_auth_signal);
MG_ABI(struct mg_counter, abi_counter);
MG_ABI(struct mg_clock, abi_clock);
MG_ABI(enum mg_drop_reason, abi_drop_reason);
MG_ABI(enum mg_fwd_reason, abi_fwd_reason);
MG_ABI(enum mg_event_type, abi_event_type);
MG_ABI(enum mg_action, abi_action);
MG_ABI(enum mg_direction, abi_direction);
MG_ABI(enum mg_family, abi_family);
MG_ABI(enum mg_ct_timeout, abi_ct_timeout);
MG_ABI(enum mg_config_flags, abi_config_flags);
MG_ABI(enum mg_subject_flags, abi_subject_flags);
MG_ABI(enum mg_endpoint_flags, abi_endpoint_flags);
MG_ABI(enum mg_ct_flags, abi_ct_flags);
MG_ABI(enum mg_reserved_identity, abi_reserved_identity);

char _license[] SEC("license") = "GPL";
