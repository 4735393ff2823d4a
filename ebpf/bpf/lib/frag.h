/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Fragments. Only the first fragment carries the L4 header, so later
 * fragments cannot be matched against a port. When a first fragment is
 * admitted, its ports are recorded under (src, dst, fragment id, protocol);
 * a later fragment takes its ports from there and then goes through
 * conntrack and policy like any packet. A later fragment with no record
 * (its first fragment was dropped, not yet seen, or evicted) is dropped:
 * out-of-order first fragments cost a retransmission, never a bypass.
 * The map is an LRU; user space also ages entries out (MG frag GC).
 */
#ifndef MG_FRAG_H
#define MG_FRAG_H

#include "common.h"
#include "parse.h"

#ifndef MG_FRAG_MAX
#define MG_FRAG_MAX 8192
#endif

struct mg_frag_key {
	__u8 saddr[16] MG_ADDR_ALIGN;
	__u8 daddr[16] MG_ADDR_ALIGN;
	__u32 id;
	__u8 protocol;    /* IPv4 protocol, or the IPv6 fragment header's next header */
	__u8 family;
	__u8 pad[2];
};

struct mg_frag_value {
	__u64 created;    /* jiffies */
	__be16 sport;
	__be16 dport;
	__be16 policy_port;
	__u8 protocol;    /* the L4 protocol of the datagram */
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mg_frag_key);
	__type(value, struct mg_frag_value);
	__uint(max_entries, MG_FRAG_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_frag SEC(".maps");

static __always_inline void mg_frag_key_of(const struct mg_pkt *pkt, struct mg_frag_key *key)
{
	mg_addr_copy(key->saddr, pkt->saddr, 16);
	mg_addr_copy(key->daddr, pkt->daddr, 16);
	key->id = pkt->frag_id;
	key->protocol = pkt->frag_proto;
	key->family = pkt->family;
}

/* For an admitted first fragment. */
static __always_inline void mg_frag_record(const struct mg_pkt *pkt)
{
	struct mg_frag_key key = {};
	struct mg_frag_value val = {};

	mg_frag_key_of(pkt, &key);
	val.created = mg_now();
	val.sport = pkt->sport;
	val.dport = pkt->dport;
	val.policy_port = pkt->policy_port;
	val.protocol = pkt->protocol;
	bpf_map_update_elem(&mg_frag, &key, &val, BPF_ANY);
}

/* For a later fragment: MG_OK with the ports filled in, or -DROP_FRAG_NO_FIRST. */
static __always_inline int mg_frag_resolve(struct mg_pkt *pkt)
{
	struct mg_frag_key key = {};
	struct mg_frag_value *val;

	mg_frag_key_of(pkt, &key);
	val = bpf_map_lookup_elem(&mg_frag, &key);
	if (!val)
		return -DROP_FRAG_NO_FIRST;
	pkt->sport = val->sport;
	pkt->dport = val->dport;
	pkt->policy_port = val->policy_port;
	pkt->protocol = val->protocol;
	return MG_OK;
}

#endif /* MG_FRAG_H */
