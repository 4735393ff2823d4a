/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking for every protocol, so replies and established flows
 * pass without a policy lookup.
 *
 * Keys are endpoint-relative: (local address, local port, remote address,
 * remote port, protocol), where "local" is the pod whose interface the
 * program runs on. A flow's packets in both directions map to the same key,
 * so one lookup serves both, and the same packet seen at two pods on one
 * node (egress of the sender, ingress of the receiver) makes two separate
 * entries: one pod's verdict never stands in for the other's.
 *
 * ICMP echo uses the echo id as the local port; other ICMP messages make no
 * entry (errors about a tracked flow pass as related, see pipeline.h).
 *
 * Each entry records the policy revision it was admitted under. A packet
 * that finds an entry from an older revision is re-evaluated against the
 * current policy and ipcache: still allowed, the entry is refreshed; no
 * longer allowed, the entry is deleted and the packet dropped. So a policy
 * change keeps flows that stay allowed and cuts those that do not.
 *
 * Expiry is in jiffies (mg_now(), an inlined load), cheap to read per
 * packet. The timeout depends on protocol and TCP state (mg_config); the
 * entry is rewritten only when its expiry moves by more than a second
 * (mg_config.hz jiffies) or its state changes, to keep established packets from
 * writing a shared cache line each time. User space deletes expired entries
 * (garbage collection); the map is an LRU, so it never refuses a new flow.
 */
#ifndef MG_CONNTRACK_H
#define MG_CONNTRACK_H

#include "common.h"
#include "config.h"
#include "parse.h"

#ifndef MG_CT_MAX
#define MG_CT_MAX 262144
#endif

enum mg_ct_flags {
	MG_CT_F_EGRESS = 1,      /* the first packet went from the pod */
	MG_CT_F_REPLY_SEEN = 2,  /* a packet went the other way */
	MG_CT_F_CLOSING = 4,     /* TCP FIN or RST seen */
	MG_CT_F_AUTH = 8,        /* admitted by an auth-required entry: auth is checked per packet */
};

struct mg_ct_key {
	__u8 local_addr[16] MG_ADDR_ALIGN;
	__u8 remote_addr[16] MG_ADDR_ALIGN;
	__be16 local_port;
	__be16 remote_port;
	__u8 protocol;
	__u8 family;
	__u8 pad[2];
};

struct mg_ct_entry {
	__u64 expires;           /* jiffies */
	__u32 policy_revision;
	__u32 peer_identity;     /* as of admission/re-evaluation */
	__u32 peer_node;
	__be16 policy_port;      /* the port (or ICMP type/code) the policy matched */
	__u16 flags;             /* MG_CT_F_* */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct mg_ct_key);
	__type(value, struct mg_ct_entry);
	__uint(max_entries, MG_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_ct SEC(".maps");

static __always_inline void mg_ct_key_of(const struct mg_pkt *pkt, __u8 dir, struct mg_ct_key *key)
{
	if (dir == MG_DIR_EGRESS) {
		mg_addr_copy(key->local_addr, pkt->saddr, 16);
		mg_addr_copy(key->remote_addr, pkt->daddr, 16);
		key->local_port = pkt->sport;
		key->remote_port = pkt->dport;
	} else {
		mg_addr_copy(key->local_addr, pkt->daddr, 16);
		mg_addr_copy(key->remote_addr, pkt->saddr, 16);
		key->local_port = pkt->dport;
		key->remote_port = pkt->sport;
	}
	if (pkt->flags & MG_PKT_F_ICMP_ECHO)
		key->remote_port = 0;
	key->protocol = pkt->protocol;
	key->family = pkt->family;
}

static __always_inline __u64 mg_ct_timeout(const struct mg_config *cfg, __u8 proto, __u16 flags)
{
	__u32 slot;

	switch (proto) {
	case IPPROTO_TCP:
		if (flags & MG_CT_F_CLOSING)
			slot = MG_CT_TIMEOUT_TCP_CLOSE;
		else if (flags & MG_CT_F_REPLY_SEEN)
			slot = MG_CT_TIMEOUT_TCP_EST;
		else
			slot = MG_CT_TIMEOUT_TCP_SYN;
		break;
	case IPPROTO_UDP:
		slot = MG_CT_TIMEOUT_UDP;
		break;
	case MG_IPPROTO_SCTP:
		slot = MG_CT_TIMEOUT_SCTP;
		break;
	case IPPROTO_ICMP:
	case MG_IPPROTO_ICMPV6:
		slot = MG_CT_TIMEOUT_ICMP;
		break;
	default:
		slot = MG_CT_TIMEOUT_OTHER;
	}
	if (slot >= MG_CT_TIMEOUT_MAX)
		return 0;
	return cfg->ct_timeout[slot];
}

/* Returns the live entry for `key`, or NULL. */
static __always_inline struct mg_ct_entry *mg_ct_lookup(const struct mg_ct_key *key, __u64 now)
{
	struct mg_ct_entry *e = bpf_map_lookup_elem(&mg_ct, key);

	if (e && e->expires > now)
		return e;
	return 0;
}

/* Updates state and expiry for a packet of an established flow; returns
 * FWD_CT_ESTABLISHED or FWD_CT_REPLY. */
static __always_inline int mg_ct_touch(const struct mg_config *cfg, struct mg_ct_entry *e,
				       const struct mg_pkt *pkt, __u8 dir, __u64 now)
{
	__u16 flags = e->flags;
	int reply = ((flags & MG_CT_F_EGRESS) != 0) != (dir == MG_DIR_EGRESS);
	__u64 expires;

	if (reply)
		flags |= MG_CT_F_REPLY_SEEN;
	if (pkt->flags & MG_PKT_F_TCP_FIN_RST)
		flags |= MG_CT_F_CLOSING;
	expires = now + mg_ct_timeout(cfg, pkt->protocol, flags);
	if (flags != e->flags) {
		e->flags = flags;
		e->expires = expires;
	} else if (expires > e->expires + cfg->hz) {
		e->expires = expires;
	}
	return reply ? FWD_CT_REPLY : FWD_CT_ESTABLISHED;
}

/* Returns 0, or a negative errno when the entry could not be written. */
static __always_inline int mg_ct_create(const struct mg_config *cfg, const struct mg_ct_key *key,
					const struct mg_pkt *pkt, __u8 dir, __u32 peer_identity,
					__u32 peer_node, __u16 extra_flags, __u64 now)
{
	struct mg_ct_entry e = {
		.policy_revision = cfg->policy_revision,
		.peer_identity = peer_identity,
		.peer_node = peer_node,
		.policy_port = pkt->policy_port,
		.flags = extra_flags | (dir == MG_DIR_EGRESS ? MG_CT_F_EGRESS : 0),
	};

	if (pkt->flags & MG_PKT_F_TCP_FIN_RST)
		e.flags |= MG_CT_F_CLOSING;
	e.expires = now + mg_ct_timeout(cfg, pkt->protocol, e.flags);
	return bpf_map_update_elem(&mg_ct, key, &e, BPF_ANY);
}

#endif /* MG_CONNTRACK_H */
