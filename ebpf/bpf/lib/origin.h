/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Where a packet with a pod source may come from. A source inside the
 * cluster's pod ranges is a claim to be a workload, and identities are
 * credited by source address: such a packet is accepted going to a pod
 * only if it came out of the tunnel (another node vouched for it) or out
 * of a local pod's own checked interface, and it may enter the tunnel only
 * from a local pod's interface. A host on the underlay, or a process in
 * the host's network namespace, cannot claim a pod's address — whatever
 * the interfaces' rp_filter settings, and for IPv6 too, which has none.
 *
 * The interface a packet entered the node by is skb->ingress_ifindex (0
 * for one the host sent itself). Frames auth-handshake replays to a pod go
 * out through a packet socket (ingress_ifindex 0): each carries, as its
 * mark, a one-time token user space puts in mg_replay_marks for the
 * duration of the send, naming the interface it is for.
 */
#ifndef MG_ORIGIN_H
#define MG_ORIGIN_H

#include "common.h"
#include "config.h"
#include "endpoint.h"
#include "ipcache.h"
#include "parse.h"

#ifndef MG_POD_RANGES_MAX
#define MG_POD_RANGES_MAX 256
#endif

/* The cluster's pod ranges (the agent's clusterCidrs), keyed as the ipcache. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mg_ipcache_key);
	__type(value, __u32);
	__uint(max_entries, MG_POD_RANGES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_pod_ranges SEC(".maps");

/* Replay token (the skb mark) -> the interface the replayed frame is for. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_replay_marks SEC(".maps");

static __always_inline int mg_in_pod_ranges(__u8 family, const __u8 *addr)
{
	struct mg_ipcache_key key = {};

	mg_ipcache_key_of(&key, family, addr);
	return bpf_map_lookup_elem(&mg_pod_ranges, &key) != 0;
}

/* Reads the IP version, addresses and protocol of the packet at `off`
 * into pkt. Returns 0, or -1 when it is no (whole) IPv4 or IPv6 header. */
static __always_inline int mg_origin_addrs(struct __sk_buff *skb, __u32 off, struct mg_pkt *pkt)
{
	__u8 hdr[40];

	if (bpf_skb_load_bytes(skb, off, hdr, 20))
		return -1;
	if ((hdr[0] >> 4) == 4) {
		pkt->family = MG_FAMILY_IPV4;
		pkt->protocol = hdr[9];
		__builtin_memcpy(pkt->saddr, hdr + 12, 4);
		__builtin_memcpy(pkt->daddr, hdr + 16, 4);
		return 0;
	}
	if ((hdr[0] >> 4) == 6 && !bpf_skb_load_bytes(skb, off, hdr, 40)) {
		pkt->family = MG_FAMILY_IPV6;
		pkt->protocol = hdr[6];
		__builtin_memcpy(pkt->saddr, hdr + 8, 16);
		__builtin_memcpy(pkt->daddr, hdr + 24, 16);
		return 0;
	}
	return -1;
}

/* A frame going to a pod (TC egress of its host-side veth; `eth_proto` its
 * ethertype). Returns MG_OK or -DROP_SPOOFED_ORIGIN. */
static __always_inline int mg_origin_to_pod(struct __sk_buff *skb, const struct mg_config *cfg,
					    __be16 eth_proto, struct mg_pkt *pkt)
{
	__u32 iif = skb->ingress_ifindex, mark = skb->mark;
	const __u32 *token;

	if (cfg->tunnel_ifindex && iif == cfg->tunnel_ifindex)
		return MG_OK;
	if (iif && mg_endpoint_get(iif))
		return MG_OK;
	if (eth_proto != bpf_htons(0x0800) && eth_proto != bpf_htons(0x86DD))
		return MG_OK;
	if (mg_origin_addrs(skb, ETH_HLEN, pkt) || !mg_in_pod_ranges(pkt->family, pkt->saddr))
		return MG_OK;
	if (mark) {
		token = bpf_map_lookup_elem(&mg_replay_marks, &mark);
		if (token && *token == skb->ifindex)
			return MG_OK;
	}
	return -DROP_SPOOFED_ORIGIN;
}

/* A packet entering the tunnel (TC egress of the tunnel device: no
 * link-layer header). Returns MG_OK or -DROP_SPOOFED_ORIGIN. */
static __always_inline int mg_origin_to_tunnel(struct __sk_buff *skb, struct mg_pkt *pkt)
{
	__u32 iif = skb->ingress_ifindex;

	/* A pod's own interface checked its source already (lib/endpoint.h). */
	if (iif && mg_endpoint_get(iif))
		return MG_OK;
	if (mg_origin_addrs(skb, 0, pkt) || !mg_in_pod_ranges(pkt->family, pkt->saddr))
		return MG_OK;
	return -DROP_SPOOFED_ORIGIN;
}

#endif /* MG_ORIGIN_H */
