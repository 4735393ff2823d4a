/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ipcache: IP prefix (IPv4 and IPv6 in one LPM trie) -> numeric identity and
 * node. The key's first 32 data bits (family + padding) are always part of
 * the prefix, so prefixlen = 32 + the address prefix length; IPv4 addresses
 * sit in the first 4 address bytes, the rest zero. A miss is the world.
 */
#ifndef MG_IPCACHE_H
#define MG_IPCACHE_H

#include "common.h"

#ifndef MG_IPCACHE_MAX
#define MG_IPCACHE_MAX 65536
#endif

#define MG_IPCACHE_PREFIX_BASE 32

struct mg_ipcache_key {
	__u32 prefixlen;
	__u8 family;      /* MG_FAMILY_* */
	__u8 pad[3];
	__u8 addr[16] MG_ADDR_ALIGN;
};

struct mg_ipcache_value {
	__u32 identity;
	__u32 node_id;    /* 0: not a node of this cluster */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mg_ipcache_key);
	__type(value, struct mg_ipcache_value);
	__uint(max_entries, MG_IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_ipcache SEC(".maps");

/* The full-length key of one address (also keys lib/origin.h's ranges). */
static __always_inline void mg_ipcache_key_of(struct mg_ipcache_key *key, __u8 family, const __u8 *addr)
{
	key->family = family;
	if (family == MG_FAMILY_IPV4) {
		key->prefixlen = MG_IPCACHE_PREFIX_BASE + 32;
		mg_addr_copy(key->addr, addr, 4);
	} else {
		key->prefixlen = MG_IPCACHE_PREFIX_BASE + 128;
		mg_addr_copy(key->addr, addr, 16);
	}
}

static __always_inline struct mg_ipcache_value mg_ipcache_lookup(__u8 family, const __u8 *addr)
{
	struct mg_ipcache_key key = {};
	struct mg_ipcache_value *v, out = { .identity = MG_IDENTITY_WORLD, .node_id = 0 };

	mg_ipcache_key_of(&key, family, addr);
	v = bpf_map_lookup_elem(&mg_ipcache, &key);
	if (v)
		out = *v;
	return out;
}

#endif /* MG_IPCACHE_H */
