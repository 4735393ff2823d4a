/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The established-flow fast path: IPv4 or IPv6 TCP or UDP packets of a
 * tracked flow admitted under the current policy revision, in the form
 * nearly all traffic takes (no IPv4 options or IPv6 extension headers, not
 * a fragment, whole L4 header linear).
 * For those, the full pipeline's generality (IPv6, extension headers,
 * fragments, ICMP, auth, TCP state changes) is pure overhead next to the
 * one conntrack lookup that decides.
 *
 * It enforces everything the full pipeline would for such a packet: the
 * endpoint is known (the caller checked), the source MAC and IP are the
 * pod's, the headers are well formed. Whenever anything is unusual —
 * another protocol, a header the full parser might reject, no conntrack
 * entry, an expired or stale one, an auth-required flow, a FIN or RST, the
 * first reply — it returns MG_OK and the full pipeline decides from
 * scratch, so it can only ever agree with it.
 */
#ifndef MG_FASTPATH_H
#define MG_FASTPATH_H

#include "common.h"
#include "config.h"
#include "endpoint.h"
#include "parse.h"
#include "conntrack.h"
#ifdef MG_BENCH_NEWFLOW
#include "bench.h"
#endif

/* Checks a TCP or UDP header the way the full parser would; picks the
 * conntrack timeout slot. Returns 0 when the packet may take the fast path. */
static __always_inline int mg_fastpath_l4(__u8 proto, const __u8 *l4, __u32 l4_len, __u32 *slot)
{
	if (proto == IPPROTO_TCP) {
		__u8 doff = l4[12] >> 4;

		if (doff < 5 || (__u32)doff * 4 > l4_len || (l4[13] & 0x05))
			return -1;
		*slot = MG_CT_TIMEOUT_TCP_EST;
		return 0;
	}
	if (proto == IPPROTO_UDP) {
		__u16 ulen = bpf_ntohs(*(const __be16 *)(l4 + 4));

		if (ulen < 8 || ulen > l4_len)
			return -1;
		*slot = MG_CT_TIMEOUT_UDP;
		return 0;
	}
	return -1;
}

/* The conntrack half: FWD_* for a live, current, plain entry; else MG_OK. */
static __always_inline int mg_fastpath_ct(const struct mg_config *cfg, const struct mg_ct_key *key,
					  __u8 dir, __u32 slot, __u8 *ct_miss)
{
	struct mg_ct_entry *e = bpf_map_lookup_elem(&mg_ct, key);
	__u64 now, expires;
	int reply;

	if (!e) {
		*ct_miss = 1;
		return MG_OK;
	}
	now = mg_now();
	if (e->expires <= now || e->policy_revision != cfg->policy_revision ||
	    (e->flags & (MG_CT_F_AUTH | MG_CT_F_CLOSING)))
		return MG_OK;
	reply = ((e->flags & MG_CT_F_EGRESS) != 0) != (dir == MG_DIR_EGRESS);
	if (key->protocol == IPPROTO_TCP && !(e->flags & MG_CT_F_REPLY_SEEN)) {
		/* A TCP flow's first reply changes its state: the full path records it. */
		if (reply)
			return MG_OK;
		slot = MG_CT_TIMEOUT_TCP_SYN;
	}
	expires = now + cfg->ct_timeout[slot];
	if (expires > e->expires + cfg->hz)
		e->expires = expires;
	return reply ? FWD_CT_REPLY : FWD_CT_ESTABLISHED;
}

static __always_inline int mg_fastpath_v4(struct __sk_buff *skb, const struct mg_config *cfg,
					  const struct mg_endpoint *ep, __u8 dir, __u8 *ct_miss)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *eth = data;
	struct mg_iphdr4 *ip = data + ETH_HLEN;
	__u8 *l4 = (__u8 *)(ip + 1);
	struct mg_ct_key key = {};
	__u32 tot_len, slot = 0;

	if ((void *)(l4 + 20) > data_end)
		return MG_OK;
	if (ip->ver_ihl != 0x45 || (ip->frag_off & bpf_htons(MG_IPV4_MF | MG_IPV4_OFFMASK)))
		return MG_OK;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < 40 || tot_len > skb->len - ETH_HLEN)
		return MG_OK;
	if (mg_fastpath_l4(ip->protocol, l4, tot_len - 20, &slot))
		return MG_OK;

	if (dir == MG_DIR_EGRESS) {
		if (mg_check_mac(ep, eth + 6) || !(ep->flags & MG_EP_F_HAS_IPV4) ||
		    *(__u32 *)ip->saddr != *(const __u32 *)ep->ipv4)
			return MG_OK;
		*(__u32 *)key.local_addr = *(__u32 *)ip->saddr;
		*(__u32 *)key.remote_addr = *(__u32 *)ip->daddr;
		key.local_port = *(__be16 *)l4;
		key.remote_port = *(__be16 *)(l4 + 2);
	} else {
		*(__u32 *)key.local_addr = *(__u32 *)ip->daddr;
		*(__u32 *)key.remote_addr = *(__u32 *)ip->saddr;
		key.local_port = *(__be16 *)(l4 + 2);
		key.remote_port = *(__be16 *)l4;
	}
	key.protocol = ip->protocol;
	key.family = MG_FAMILY_IPV4;
#ifdef MG_BENCH_NEWFLOW
	mg_bench_peek_key(&key);
#endif
	return mg_fastpath_ct(cfg, &key, dir, slot, ct_miss);
}

/* IPv6 with TCP or UDP right after the fixed header (no extension headers). */
static __always_inline int mg_fastpath_v6(struct __sk_buff *skb, const struct mg_config *cfg,
					  const struct mg_endpoint *ep, __u8 dir, __u8 *ct_miss)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *eth = data;
	struct mg_iphdr6 *ip = data + ETH_HLEN;
	__u8 *l4 = (__u8 *)(ip + 1);
	struct mg_ct_key key = {};
	__u32 payload_len, slot = 0;

	if ((void *)(l4 + 20) > data_end)
		return MG_OK;
	if ((bpf_ntohl(ip->ver_tc_flow) >> 28) != 6)
		return MG_OK;
	payload_len = bpf_ntohs(ip->payload_len);
	if (payload_len < 20 || payload_len > skb->len - ETH_HLEN - sizeof(*ip))
		return MG_OK;
	if (mg_fastpath_l4(ip->nexthdr, l4, payload_len, &slot))
		return MG_OK;

	if (dir == MG_DIR_EGRESS) {
		if (mg_check_mac(ep, eth + 6) || !(ep->flags & MG_EP_F_HAS_IPV6) ||
		    !mg_addr_eq(ip->saddr, ep->ipv6, 16))
			return MG_OK;
		mg_addr_copy(key.local_addr, ip->saddr, 16);
		mg_addr_copy(key.remote_addr, ip->daddr, 16);
		key.local_port = *(__be16 *)l4;
		key.remote_port = *(__be16 *)(l4 + 2);
	} else {
		mg_addr_copy(key.local_addr, ip->daddr, 16);
		mg_addr_copy(key.remote_addr, ip->saddr, 16);
		key.local_port = *(__be16 *)(l4 + 2);
		key.remote_port = *(__be16 *)l4;
	}
	key.protocol = ip->nexthdr;
	key.family = MG_FAMILY_IPV6;
	return mg_fastpath_ct(cfg, &key, dir, slot, ct_miss);
}

/* Returns FWD_CT_ESTABLISHED / FWD_CT_REPLY, or MG_OK to take the full
 * path; sets *ct_miss when it looked the flow up and found no entry at all
 * (the full path builds the very same key and need not look again). */
static __always_inline int mg_fastpath(struct __sk_buff *skb, const struct mg_config *cfg,
				       const struct mg_endpoint *ep, __u8 dir, __u8 *ct_miss)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__be16 proto;

	if (data + ETH_HLEN > data_end)
		return MG_OK;
	proto = *(__be16 *)(data + 12);
	if (proto == bpf_htons(0x0800))
		return mg_fastpath_v4(skb, cfg, ep, dir, ct_miss);
	if (proto == bpf_htons(0x86DD))
		return mg_fastpath_v6(skb, cfg, ep, dir, ct_miss);
	return MG_OK;
}

#endif /* MG_FASTPATH_H */
