/* SPDX-License-Identifier: Apache-2.0 */
/*
 * auth: (local identity, remote identity, remote node) -> expiry, written by
 * auth-handshake after a mutual TLS handshake. Expiry is CLOCK_BOOTTIME
 * (bpf_ktime_get_boot_ns), which keeps counting across suspend; user space
 * converts wall-clock SVID expiry into it. A miss or an expired entry drops
 * the packet and signals auth-handshake through the ring buffer, at most
 * once per key and signal interval (mg_auth_sig, updated by compare and
 * exchange so concurrent CPUs send one signal, not one each).
 */
#ifndef MG_AUTH_H
#define MG_AUTH_H

#include "common.h"
#include "config.h"

#ifndef MG_AUTH_MAX
#define MG_AUTH_MAX 65536
#endif

struct mg_auth_key {
	__u32 local_identity;
	__u32 remote_identity;
	__u32 remote_node;
	__u32 pad;
};

struct mg_auth_value {
	__u64 expires_boot_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct mg_auth_key);
	__type(value, struct mg_auth_value);
	__uint(max_entries, MG_AUTH_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_auth SEC(".maps");

/* Last signal time per key (CLOCK_BOOTTIME). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mg_auth_key);
	__type(value, __u64);
	__uint(max_entries, MG_AUTH_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_auth_sig SEC(".maps");

/* 1 when the key has a live entry. */
static __always_inline int mg_auth_live(const struct mg_auth_key *key)
{
	struct mg_auth_value *v = bpf_map_lookup_elem(&mg_auth, key);

	return v && v->expires_boot_ns > bpf_ktime_get_boot_ns();
}

/* 1 when the caller should send an auth-required signal for `key` now. */
static __always_inline int mg_auth_should_signal(const struct mg_config *cfg, const struct mg_auth_key *key)
{
	__u64 now = bpf_ktime_get_boot_ns();
	__u64 *last = bpf_map_lookup_elem(&mg_auth_sig, key);
	__u64 seen;

	if (!last) {
		/* BPF_NOEXIST: of two CPUs racing here, one wins. */
		return bpf_map_update_elem(&mg_auth_sig, key, &now, BPF_NOEXIST) == 0;
	}
	seen = *last;
	if (now - seen < cfg->auth_signal_interval_ns)
		return 0;
	return __sync_val_compare_and_swap(last, seen, now) == seen;
}

#endif /* MG_AUTH_H */
