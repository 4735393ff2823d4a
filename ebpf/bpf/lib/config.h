/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The datapath's global configuration: one entry in an array map, written
 * by user space (Rust `Config`). Until the READY flag is set every packet is
 * dropped (fail closed).
 */
#ifndef MG_CONFIG_H
#define MG_CONFIG_H

#include "common.h"

enum mg_ct_timeout {
	MG_CT_TIMEOUT_TCP_SYN = 0,    /* TCP flow that has seen no reply yet */
	MG_CT_TIMEOUT_TCP_EST = 1,    /* TCP flow that has seen a reply */
	MG_CT_TIMEOUT_TCP_CLOSE = 2,  /* TCP flow after FIN or RST */
	MG_CT_TIMEOUT_UDP = 3,
	MG_CT_TIMEOUT_SCTP = 4,
	MG_CT_TIMEOUT_ICMP = 5,
	MG_CT_TIMEOUT_OTHER = 6,
	MG_CT_TIMEOUT_MAX = 7,
};

enum mg_config_flags {
	MG_CFG_F_READY = 1,
};

/* Which policy lookups can match for a subject (see lib/policy.h). */
enum mg_subject_flags {
	MG_SUBJ_F_DEFAULT_DENY = 1,  /* selected by a policy in this direction */
	MG_SUBJ_F_EXACT_PEERS = 2,   /* has entries for specific peer identities */
	MG_SUBJ_F_ANY_PEER = 4,      /* has entries for the any-peer wildcard */
};

struct mg_config {
	__u32 flags;                              /* MG_CFG_F_* */
	/* Bumped by user space on every policy or ipcache change; a conntrack
	 * entry from an older revision is re-evaluated on its next packet. */
	__u32 policy_revision;
	__u32 local_node_id;
	/* MG_SUBJ_F_* for the any-subject wildcard, per direction. */
	__u32 any_subject_flags[MG_DIR_MAX];
	/* Jiffies per second (the kernel's HZ), probed by user space. */
	__u32 hz;
	/* Conntrack timeouts, in jiffies. */
	__u64 ct_timeout[MG_CT_TIMEOUT_MAX];
	/* At most one auth-required signal per identity pair and node per interval. */
	__u64 auth_signal_interval_ns;
	/* The WireGuard tunnel device: packets out of it may carry any pod
	 * source (lib/origin.h). 0 until user space guards the tunnel. */
	__u32 tunnel_ifindex;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct mg_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_config SEC(".maps");

static __always_inline const struct mg_config *mg_config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&mg_config, &zero);
}

#endif /* MG_CONFIG_H */
