/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The verdict pipeline run by both entry points, for one pod interface:
 *
 *   config ready? -> endpoint (by ifindex) -> Ethernet (+ MAC anti-spoofing
 *   from the pod) -> ARP | IPv4 | IPv6 parse -> IP anti-spoofing from the
 *   pod -> neighbour discovery passes (the parser admits only ND confined
 *   to the link, lib/nd.h) ->
 *   later fragment gets its first fragment's ports -> conntrack hit
 *   (current revision: pass; older: re-evaluate) -> ICMP error mirroring a
 *   tracked flow passes -> new flow:
 *   ipcache (peer identity and node) -> policy -> auth -> conntrack entry.
 *
 * Returns a positive FWD_* or a negative DROP_* (lib/common.h); the entry
 * wrapper mg_handle() counts it, sends the drop event where one is due, and
 * returns TC_ACT_OK or TC_ACT_SHOT.
 */
#ifndef MG_PIPELINE_H
#define MG_PIPELINE_H

#include "common.h"
#include "config.h"
#include "endpoint.h"
#include "parse.h"
#include "frag.h"
#include "ipcache.h"
#include "policy.h"
#include "auth.h"
#include "conntrack.h"
#include "events.h"
#include "counters.h"
#include "fastpath.h"
#include "origin.h"
#ifdef MG_BENCH_NEWFLOW
#include "bench.h"
#endif

#define MG_ETH_P_IP 0x0800
#define MG_ETH_P_IPV6 0x86DD
#define MG_ETH_P_ARP 0x0806

/* What a verdict was about, for its event. */
struct mg_info {
	__u32 subject;
	__u32 peer;
	__u32 peer_node;
	__u32 cookie;
	__u8 auth_signal;  /* send an auth-required signal */
	__u8 ct_miss;      /* the fast path found no conntrack entry for this packet's key */
	__u8 new_flow;     /* a conntrack entry was created: tell observers once */
};

struct mg_arp {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
};

static __always_inline int mg_handle_arp(struct __sk_buff *skb, const struct mg_endpoint *ep, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_arp *arp = data + ETH_HLEN;
	__u32 zero = 0;

	if ((void *)(arp + 1) > data_end)
		return -DROP_TRUNCATED_ARP;
	if (dir == MG_DIR_EGRESS) {
		if (mg_check_mac(ep, arp->sha))
			return -DROP_SPOOFED_MAC;
		/* 0.0.0.0 is an ARP probe (address conflict detection). */
		if (!mg_addr_eq(arp->spa, (const __u8 *)&zero, 4) &&
		    (!(ep->flags & MG_EP_F_HAS_IPV4) || !mg_addr_eq(arp->spa, ep->ipv4, 4)))
			return -DROP_SPOOFED_IP;
	}
	return FWD_ARP;
}

static __always_inline void mg_signal_auth(const struct mg_config *cfg, struct mg_info *info)
{
	struct mg_auth_key key = {
		.local_identity = info->subject,
		.remote_identity = info->peer,
		.remote_node = info->peer_node,
	};

	info->auth_signal = mg_auth_should_signal(cfg, &key);
}

static __always_inline int mg_auth_ok(__u32 subject, __u32 peer, __u32 node)
{
	struct mg_auth_key key = {
		.local_identity = subject,
		.remote_identity = peer,
		.remote_node = node,
	};

	return mg_auth_live(&key);
}

/* Whether an ICMP error's own addresses mirror the packet it quotes. An
 * error the pod sends reports a packet it received: it goes back to that
 * packet's sender, from the pod. An error to the pod reports a packet the
 * pod sent: it comes to the pod from that packet's destination, or from a
 * router on the way — an address with no workload identity, since every
 * workload is anti-spoofed and is no router. Anything else would let a
 * third pod reach this one (or this one reach a third) by quoting a flow.
 * A global function, like mg_nd_on_link (lib/nd.h), for the verifier. */
__attribute__((noinline)) int mg_icmp_mirrors(const struct mg_pkt *pkt, const struct mg_pkt *inner, __u32 dir)
{
	int len;
	struct mg_ipcache_value ipc;

	/* A global function checks its own arguments (see lib/nd.h). */
	if (!pkt || !inner)
		return 0;
	len = pkt->family == MG_FAMILY_IPV4 ? 4 : 16;
	if (!mg_addr_eq(pkt->daddr, inner->saddr, len))
		return 0;
	if (mg_addr_eq(pkt->saddr, inner->daddr, len))
		return 1;
	if (dir == MG_DIR_EGRESS)
		return 0;
	ipc = mg_ipcache_lookup(pkt->family, pkt->saddr);
	return ipc.identity < MG_IDENTITY_MIN_WORKLOAD;
}

/* An ICMP error quoting a packet of a tracked flow, and mirroring it
 * (mg_icmp_mirrors). The quoted packet went the other way, so its key is
 * built for the opposite direction. Returns FWD_CT_RELATED, or MG_OK when
 * the error is about no tracked flow or does not mirror it: then it is
 * judged as a new flow of its own. */
static __always_inline int mg_icmp_related(struct __sk_buff *skb, const struct mg_pkt *pkt, __u8 dir, __u64 now)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_pkt inner = {};
	struct mg_ct_key key = {};
	__u32 off = pkt->l4_off + 8;
	__u8 *p;

	if (off > MG_MAX_L3_OFF + ETH_HLEN + 8)
		return MG_OK;
	p = data + off;
	inner.family = pkt->family;
	if (pkt->family == MG_FAMILY_IPV4) {
		struct mg_iphdr4 *ip = (void *)p;
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return MG_OK;
		ihl = (__u32)(ip->ver_ihl & 0x0f) * 4;
		if (ihl < 20 || ihl > 60)
			return MG_OK;
		inner.protocol = ip->protocol;
		mg_addr_copy(inner.saddr, ip->saddr, 4);
		mg_addr_copy(inner.daddr, ip->daddr, 4);
		p += ihl;
	} else {
		struct mg_iphdr6 *ip = (void *)p;

		if ((void *)(ip + 1) > data_end)
			return MG_OK;
		inner.protocol = ip->nexthdr;
		mg_addr_copy(inner.saddr, ip->saddr, 16);
		mg_addr_copy(inner.daddr, ip->daddr, 16);
		p += sizeof(*ip);
	}
	if ((void *)(p + 8) > data_end)
		return MG_OK;
	switch (inner.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case MG_IPPROTO_SCTP:
		inner.sport = *(__be16 *)p;
		inner.dport = *(__be16 *)(p + 2);
		break;
	case IPPROTO_ICMP:
	case MG_IPPROTO_ICMPV6:
		inner.flags = MG_PKT_F_ICMP_ECHO;
		inner.sport = *(__be16 *)(p + 4);
		inner.dport = inner.sport;
		break;
	default:
		break;
	}
	if (!mg_icmp_mirrors(pkt, &inner, dir))
		return MG_OK;
	mg_ct_key_of(&inner, dir == MG_DIR_EGRESS ? MG_DIR_INGRESS : MG_DIR_EGRESS, &key);
	return mg_ct_lookup(&key, now) ? FWD_CT_RELATED : MG_OK;
}

/* A conntrack entry from an older policy revision: decide again, in the
 * direction of the flow's first packet. */
static __always_inline int mg_ct_reevaluate(const struct mg_config *cfg, const struct mg_endpoint *ep,
					    const struct mg_ct_key *key, struct mg_ct_entry *e,
					    const struct mg_pkt *pkt, __u8 dir, __u64 now,
					    struct mg_info *info)
{
	__u8 origin = (e->flags & MG_CT_F_EGRESS) ? MG_DIR_EGRESS : MG_DIR_INGRESS;
	struct mg_ipcache_value ipc = mg_ipcache_lookup(key->family, key->remote_addr);
	struct mg_policy_result res;
	__u16 flags = e->flags & ~MG_CT_F_AUTH;
	int drop = 0;

	info->peer = ipc.identity;
	info->peer_node = ipc.node_id;
	res = mg_policy_eval(cfg, ep->identity, ipc.identity, origin, key->protocol, e->policy_port);
	info->cookie = res.cookie;
	if (res.action == MG_ACTION_DENY) {
		drop = -DROP_POLICY_DENY;
	} else if (res.action == MG_ACTION_NONE && res.default_deny) {
		drop = -DROP_POLICY_DEFAULT;
	} else if (res.action == MG_ACTION_AUTH) {
		if (!mg_auth_ok(ep->identity, ipc.identity, ipc.node_id)) {
			mg_signal_auth(cfg, info);
			drop = -DROP_AUTH_REQUIRED;
		}
		flags |= MG_CT_F_AUTH;
	}
	if (drop) {
		bpf_map_delete_elem(&mg_ct, key);
		return drop;
	}
	e->policy_revision = cfg->policy_revision;
	e->peer_identity = ipc.identity;
	e->peer_node = ipc.node_id;
	e->flags = flags;
	mg_ct_touch(cfg, e, pkt, dir, now);
	return FWD_CT_REEVALUATED;
}

static __always_inline int mg_new_flow(const struct mg_config *cfg, const struct mg_endpoint *ep,
				       const struct mg_ct_key *key, const struct mg_pkt *pkt, __u8 dir,
				       __u64 now, struct mg_info *info)
{
	struct mg_ipcache_value ipc = mg_ipcache_lookup(pkt->family, key->remote_addr);
	struct mg_policy_result res;
	__u16 ct_flags = 0;
	int fwd;

	info->peer = ipc.identity;
	info->peer_node = ipc.node_id;
	res = mg_policy_eval(cfg, ep->identity, ipc.identity, dir, pkt->protocol, pkt->policy_port);
	info->cookie = res.cookie;
	switch (res.action) {
	case MG_ACTION_DENY:
		return -DROP_POLICY_DENY;
	case MG_ACTION_AUTH:
		if (!mg_auth_ok(ep->identity, ipc.identity, ipc.node_id)) {
			mg_signal_auth(cfg, info);
			return -DROP_AUTH_REQUIRED;
		}
		ct_flags = MG_CT_F_AUTH;
		fwd = FWD_AUTH_ALLOW;
		break;
	case MG_ACTION_ALLOW:
		fwd = FWD_POLICY_ALLOW;
		break;
	default:
		if (res.default_deny)
			return -DROP_POLICY_DEFAULT;
		fwd = FWD_UNSELECTED;
	}
	/* ICMP other than echo has no flow to track. */
	if (!((pkt->protocol == IPPROTO_ICMP || pkt->protocol == MG_IPPROTO_ICMPV6) &&
	      !(pkt->flags & MG_PKT_F_ICMP_ECHO))) {
		if (mg_ct_create(cfg, key, pkt, dir, ipc.identity, ipc.node_id, ct_flags, now))
			mg_count(dir, NOTICE_CT_INSERT_FAILED, 0);
		else
			info->new_flow = 1;
	}
	if (pkt->flags & MG_PKT_F_FRAG_FIRST)
		mg_frag_record(pkt);
	return fwd;
}

static __always_inline int mg_verdict(const struct mg_config *cfg, const struct mg_endpoint *ep,
				      struct __sk_buff *skb, struct mg_pkt *pkt, __u8 dir,
				      struct mg_info *info)
{
	__u64 now = mg_now();
	struct mg_ct_key key = {};
	struct mg_ct_entry *e;
	int ret;

	mg_ct_key_of(pkt, dir, &key);
	e = info->ct_miss ? 0 : mg_ct_lookup(&key, now);
	if (e) {
		if (e->policy_revision != cfg->policy_revision)
			return mg_ct_reevaluate(cfg, ep, &key, e, pkt, dir, now, info);
		if ((e->flags & MG_CT_F_AUTH) &&
		    !mg_auth_ok(ep->identity, e->peer_identity, e->peer_node)) {
			info->peer = e->peer_identity;
			info->peer_node = e->peer_node;
			mg_signal_auth(cfg, info);
			return -DROP_AUTH_REQUIRED;
		}
		return mg_ct_touch(cfg, e, pkt, dir, now);
	}
	if (pkt->flags & MG_PKT_F_ICMP_ERROR) {
		ret = mg_icmp_related(skb, pkt, dir, now);
		if (ret)
			return ret;
	}
	return mg_new_flow(cfg, ep, &key, pkt, dir, now, info);
}

static __always_inline int mg_process(struct __sk_buff *skb, __u8 dir, struct mg_pkt *pkt,
				      struct mg_info *info)
{

	const struct mg_config *cfg = mg_config_get();
	const struct mg_endpoint *ep;
	void *data, *data_end;
	__u8 *eth;
	__be16 proto;
	int ret;

	if (!cfg || !(cfg->flags & MG_CFG_F_READY))
		return -DROP_NOT_READY;
	ep = mg_endpoint_get(skb->ifindex);
	if (!ep)
		return -DROP_UNKNOWN_ENDPOINT;
	info->subject = ep->identity;

	mg_pull(skb);
	if (dir == MG_DIR_INGRESS) {
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + ETH_HLEN > data_end)
			return -DROP_TRUNCATED_ETH;
		ret = mg_origin_to_pod(skb, cfg, *(__be16 *)(data + 12), pkt);
		if (ret < 0)
			return ret;
	}
	ret = mg_fastpath(skb, cfg, ep, dir, &info->ct_miss);
	if (ret)
		return ret;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + ETH_HLEN) > data_end)
		return -DROP_TRUNCATED_ETH;
	if (dir == MG_DIR_EGRESS) {
		ret = mg_check_mac(ep, eth + 6);
		if (ret < 0)
			return ret;
	}
	proto = *(__be16 *)(eth + 12);
	if (proto == bpf_htons(MG_ETH_P_IP))
		ret = mg_parse_ipv4(skb, pkt);
	else if (proto == bpf_htons(MG_ETH_P_IPV6))
		ret = mg_parse_ipv6(skb, pkt);
	else if (proto == bpf_htons(MG_ETH_P_ARP))
		return mg_handle_arp(skb, ep, dir);
	else
		return -DROP_UNKNOWN_L3;
	if (ret < 0)
		return ret;

	if (dir == MG_DIR_EGRESS) {
		ret = mg_check_src_ip(ep, pkt->family, pkt->saddr);
		/* Neighbour discovery and MLD come from link-local or :: too. */
		if (ret < 0 && !((pkt->flags & MG_PKT_F_ND) &&
				 (mg_ipv6_link_local(pkt->saddr) || mg_ipv6_unspecified(pkt->saddr))))
			return ret;
	}
	if (pkt->flags & MG_PKT_F_ND)
		return FWD_ICMPV6_ND;
	if (pkt->flags & MG_PKT_F_FRAG_LATER) {
		ret = mg_frag_resolve(pkt);
		if (ret < 0)
			return ret;
	}
#ifdef MG_BENCH_NEWFLOW
	mg_bench_perturb(pkt);
#endif
	return mg_verdict(cfg, ep, skb, pkt, dir, info);
}

static __always_inline int mg_drop_has_event(__u32 reason)
{
	return reason == DROP_POLICY_DENY || reason == DROP_POLICY_DEFAULT ||
	       reason == DROP_SPOOFED_MAC || reason == DROP_SPOOFED_IP || reason == DROP_INVALID_ND ||
	       reason == DROP_SPOOFED_ORIGIN;
}

static __always_inline int mg_handle(struct __sk_buff *skb, __u8 dir)
{
	struct mg_pkt pkt = {};
	struct mg_info info = {};
	__u32 len = skb->len;
	int ret = mg_process(skb, dir, &pkt, &info);

	if (info.auth_signal &&
	    mg_auth_signal_send(skb, dir, &pkt, info.subject, info.peer, info.peer_node, info.cookie))
		mg_count(dir, NOTICE_EVENT_LOST, 0);
	if (ret >= 0) {
		mg_count(dir, ret, len);
		if (info.new_flow &&
		    mg_event_send(MG_EVENT_FLOW, ret, dir, skb->ifindex, &pkt, info.subject, info.peer,
				  info.peer_node, info.cookie))
			mg_count(dir, NOTICE_EVENT_LOST, 0);
		return TC_ACT_OK;
	}
	mg_count(dir, -ret, len);
	if (mg_drop_has_event(-ret) &&
	    mg_event_send(MG_EVENT_DROP, -ret, dir, skb->ifindex, &pkt, info.subject, info.peer,
			  info.peer_node, info.cookie))
		mg_count(dir, NOTICE_EVENT_LOST, 0);
	return TC_ACT_SHOT;
}

/* The tunnel device's TC egress: only a pod's own interface may send into
 * the tunnel with a pod source. Counted as the pods' egress. */
static __always_inline int mg_handle_tunnel(struct __sk_buff *skb)
{
	const struct mg_config *cfg = mg_config_get();
	struct mg_pkt pkt = {};
	__u32 len = skb->len;
	int ret;

	if (!cfg || !(cfg->flags & MG_CFG_F_READY))
		ret = -DROP_NOT_READY;
	else
		ret = mg_origin_to_tunnel(skb, &pkt);
	if (ret == MG_OK)
		return TC_ACT_OK;
	mg_count(MG_DIR_EGRESS, -ret, len);
	if (mg_drop_has_event(-ret) &&
	    mg_event_send(MG_EVENT_DROP, -ret, MG_DIR_EGRESS, skb->ifindex, &pkt, 0, 0, 0, 0))
		mg_count(MG_DIR_EGRESS, NOTICE_EVENT_LOST, 0);
	return TC_ACT_SHOT;
}

#endif /* MG_PIPELINE_H */
