/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet parsing: Ethernet, IPv4 (with options), IPv6 (with extension
 * headers), then TCP, UDP, SCTP (ports from the common header), ICMP and
 * ICMPv6 (type and code) or any other protocol by number.
 *
 * Every header is bounds-checked against both the linear data and the
 * length the IP header claims; anything short or inconsistent returns a
 * negative DROP_* reason and is never let through.
 *
 * Fragments: the first fragment carries the L4 header and is parsed as
 * usual (it must hold the whole L4 header, else DROP_FRAG_INVALID); a later
 * fragment is flagged MG_PKT_F_FRAG_LATER with no ports, and lib/frag.h
 * gives it the ports of its first fragment, or drops it.
 */
#ifndef MG_PARSE_H
#define MG_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>

#include "common.h"

#define MG_PULL_LEN 256      /* headers beyond this are treated as truncated */
#define MG_MAX_EXTHDRS 8
#define MG_MAX_L3_OFF 200    /* bounds the variable L4 offset for the verifier */

#define MG_IPPROTO_ICMPV6 58
#define MG_IPPROTO_SCTP 132

enum mg_pkt_flags {
	MG_PKT_F_FRAG_FIRST = 1,   /* first fragment of a fragmented datagram */
	MG_PKT_F_FRAG_LATER = 2,   /* a later fragment: no L4 header */
	MG_PKT_F_ICMP_ECHO = 4,    /* echo request/reply: the id stands for the ports */
	MG_PKT_F_ICMP_ERROR = 8,   /* ICMP error: an inner packet follows */
	MG_PKT_F_ND = 16,          /* ICMPv6 neighbour discovery or MLD: lib/nd.h says if it stays on the link */
	MG_PKT_F_TCP_SYN = 32,
	MG_PKT_F_TCP_FIN_RST = 64,
};

/* What the rest of the pipeline knows about a packet. */
struct mg_pkt {
	__u8 saddr[16] MG_ADDR_ALIGN;
	__u8 daddr[16] MG_ADDR_ALIGN;
	__be16 sport;        /* TCP/UDP/SCTP ports; for ICMP echo both are the id */
	__be16 dport;
	__be16 policy_port;  /* what the policy matches: dport, or ICMP type<<8|code */
	__u8 family;         /* MG_FAMILY_* */
	__u8 protocol;       /* L4 protocol; for a later IPv6 fragment, the fragment header's next header */
	__u32 flags;         /* MG_PKT_F_* */
	__u32 frag_id;       /* IPv4 id or IPv6 fragment id */
	__u8 frag_proto;     /* the protocol keying the fragment map */
	__u8 icmp_type;
	__u16 l4_off;        /* offset of the L4 header from the start of the frame */
	__u8 hop_limit;      /* IPv6 hop limit (ND and MLD are judged by it) */
	__u32 len;           /* skb length, for counters */
};

struct mg_iphdr4 {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u8 saddr[4];
	__u8 daddr[4];
};

struct mg_iphdr6 {
	__be32 ver_tc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

#include "nd.h"

#define MG_IPV4_MF 0x2000
#define MG_IPV4_OFFMASK 0x1fff

/* The smallest L4 header the datapath accepts, per protocol (0: none). */
static __always_inline __u32 mg_l4_min_len(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return 20;
	case IPPROTO_UDP:
		return 8;
	case MG_IPPROTO_SCTP:
		return 12;
	case IPPROTO_ICMP:
	case MG_IPPROTO_ICMPV6:
		return 8;
	}
	return 0;
}

static __always_inline int mg_is_icmp_error(__u8 family, __u8 type)
{
	if (family == MG_FAMILY_IPV4)
		return type == 3 || type == 11 || type == 12;
	return type >= 1 && type <= 4;
}

/* Parses the L4 header at pkt->l4_off; `l4_len` is what the IP header says
 * the L4 part holds. Returns MG_OK or a negative DROP_*. */
static __always_inline int mg_parse_l4(struct __sk_buff *skb, struct mg_pkt *pkt, __u32 l4_len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 off = pkt->l4_off;
	__u32 need = mg_l4_min_len(pkt->protocol);
	__u8 *l4;

	if (!need) {
		pkt->policy_port = 0;  /* other protocols: by number only */
		return MG_OK;
	}
	if (off > MG_MAX_L3_OFF + ETH_HLEN)
		return -DROP_TRUNCATED_L4;
	l4 = data + off;
	if ((void *)l4 + need > data_end || l4_len < need)
		return (pkt->flags & MG_PKT_F_FRAG_FIRST) ? -DROP_FRAG_INVALID : -DROP_TRUNCATED_L4;

	switch (pkt->protocol) {
	case IPPROTO_TCP: {
		if ((void *)(l4 + 20) > data_end)
			return -DROP_TRUNCATED_L4;
		__u8 doff = l4[12] >> 4;
		__u8 tcpflags = l4[13];

		if (doff < 5)
			return -DROP_INVALID_L4;
		if ((__u32)doff * 4 > l4_len)
			return (pkt->flags & MG_PKT_F_FRAG_FIRST) ? -DROP_FRAG_INVALID : -DROP_TRUNCATED_L4;
		if (tcpflags & 0x02)
			pkt->flags |= MG_PKT_F_TCP_SYN;
		if (tcpflags & 0x05)
			pkt->flags |= MG_PKT_F_TCP_FIN_RST;
		break;
	}
	case IPPROTO_UDP: {
		if ((void *)(l4 + 8) > data_end)
			return -DROP_TRUNCATED_L4;
		__u16 ulen = bpf_ntohs(*(__be16 *)(l4 + 4));

		/* A first fragment's UDP length covers the whole datagram. */
		if (ulen < 8 || (!(pkt->flags & MG_PKT_F_FRAG_FIRST) && ulen > l4_len))
			return -DROP_INVALID_L4;
		break;
	}
	case MG_IPPROTO_SCTP:
		if ((void *)(l4 + 12) > data_end)
			return -DROP_TRUNCATED_L4;
		break;
	default: {
		/* ICMP and ICMPv6: type, code, checksum, then id/seq or unused. */
		if ((void *)(l4 + 8) > data_end)
			return -DROP_TRUNCATED_L4;
		__u8 type = l4[0], code = l4[1];

		pkt->icmp_type = type;
		pkt->policy_port = bpf_htons(((__u16)type << 8) | code);
		pkt->sport = 0;
		pkt->dport = 0;
		if (pkt->family == MG_FAMILY_IPV4 ? (type == 8 || type == 0)
						  : (type == 128 || type == 129)) {
			pkt->flags |= MG_PKT_F_ICMP_ECHO;
			pkt->sport = *(__be16 *)(l4 + 4);
			pkt->dport = pkt->sport;
		} else if (mg_is_icmp_error(pkt->family, type)) {
			pkt->flags |= MG_PKT_F_ICMP_ERROR;
		} else if (pkt->family == MG_FAMILY_IPV6 &&
			   ((type >= 130 && type <= 137) || type == 143)) {
			pkt->flags |= MG_PKT_F_ND;
			return mg_nd_on_link(pkt);
		}
		return MG_OK;
	}
	}
	pkt->sport = *(__be16 *)l4;
	pkt->dport = *(__be16 *)(l4 + 2);
	pkt->policy_port = pkt->dport;
	return MG_OK;
}

static __always_inline int mg_parse_ipv4(struct __sk_buff *skb, struct mg_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_iphdr4 *ip = data + ETH_HLEN;
	__u32 ihl, tot_len, frag;

	if ((void *)(ip + 1) > data_end)
		return -DROP_TRUNCATED_IPV4;
	ihl = (__u32)(ip->ver_ihl & 0x0f) * 4;
	if ((ip->ver_ihl >> 4) != 4 || ihl < 20)
		return -DROP_INVALID_IPV4;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl || tot_len > skb->len - ETH_HLEN)
		return -DROP_INVALID_IPV4;
	if (data + ETH_HLEN + ihl > data_end)
		return -DROP_TRUNCATED_IPV4;

	pkt->family = MG_FAMILY_IPV4;
	pkt->protocol = ip->protocol;
	pkt->frag_proto = ip->protocol;
	mg_addr_copy(pkt->saddr, ip->saddr, 4);
	mg_addr_copy(pkt->daddr, ip->daddr, 4);
	pkt->l4_off = ETH_HLEN + ihl;

	frag = bpf_ntohs(ip->frag_off);
	if (frag & (MG_IPV4_MF | MG_IPV4_OFFMASK)) {
		pkt->frag_id = bpf_ntohs(ip->id);
		if (frag & MG_IPV4_OFFMASK) {
			/* A later fragment overlapping the L4 header (RFC 1858's
			 * tiny-offset attack) could rewrite the ports. */
			if ((frag & MG_IPV4_OFFMASK) * 8 < mg_l4_min_len(ip->protocol))
				return -DROP_FRAG_INVALID;
			pkt->flags |= MG_PKT_F_FRAG_LATER;
			return MG_OK;
		}
		pkt->flags |= MG_PKT_F_FRAG_FIRST;
	}
	return mg_parse_l4(skb, pkt, tot_len - ihl);
}

static __always_inline int mg_is_ipv6_exthdr(__u8 nh)
{
	/* hop-by-hop, routing, fragment, destination options, AH, mobility,
	 * HIP, shim6 */
	return nh == 0 || nh == 43 || nh == 44 || nh == 60 || nh == 51 ||
	       nh == 135 || nh == 139 || nh == 140;
}

static __always_inline int mg_parse_ipv6(struct __sk_buff *skb, struct mg_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_iphdr6 *ip = data + ETH_HLEN;
	__u32 off = ETH_HLEN + sizeof(*ip), payload_len, end;
	__u8 nh;
	int i;

	if ((void *)(ip + 1) > data_end)
		return -DROP_TRUNCATED_IPV6;
	if ((bpf_ntohl(ip->ver_tc_flow) >> 28) != 6)
		return -DROP_INVALID_IPV6;
	payload_len = bpf_ntohs(ip->payload_len);
	/* payload_len 0 would be a jumbogram: not on this link. */
	if (payload_len == 0 || payload_len > skb->len - off)
		return -DROP_INVALID_IPV6;
	end = off + payload_len;

	pkt->family = MG_FAMILY_IPV6;
	pkt->hop_limit = ip->hop_limit;
	mg_addr_copy(pkt->saddr, ip->saddr, 16);
	mg_addr_copy(pkt->daddr, ip->daddr, 16);
	nh = ip->nexthdr;

	for (i = 0; i < MG_MAX_EXTHDRS; i++) {
		__u8 *h;
		__u32 hlen;

		if (!mg_is_ipv6_exthdr(nh))
			break;
		if (off > MG_MAX_L3_OFF)
			return -DROP_TRUNCATED_EXTHDR;
		h = data + off;
		if ((void *)(h + 8) > data_end || off + 8 > end)
			return -DROP_TRUNCATED_EXTHDR;
		if (nh == 44) {
			__u16 fo = bpf_ntohs(*(__be16 *)(h + 2));

			/* An atomic fragment (offset 0, no M flag) is whole. */
			if (fo & 0xfff9) {
				pkt->frag_id = bpf_ntohl(*(__be32 *)(h + 4));
				pkt->frag_proto = h[0];
				if (fo >> 3) {
					if ((fo >> 3) * 8 < mg_l4_min_len(h[0]))
						return -DROP_FRAG_INVALID;
					pkt->protocol = h[0];
					pkt->flags |= MG_PKT_F_FRAG_LATER;
					return MG_OK;
				}
				pkt->flags |= MG_PKT_F_FRAG_FIRST;
			}
			hlen = 8;
		} else if (nh == 51) {
			hlen = ((__u32)h[1] + 2) * 4;  /* AH counts 4-byte units */
		} else {
			hlen = ((__u32)h[1] + 1) * 8;
		}
		nh = h[0];
		off += hlen;
		if (off > end)
			return -DROP_TRUNCATED_EXTHDR;
	}
	if (mg_is_ipv6_exthdr(nh))
		return -DROP_TOO_MANY_EXTHDRS;

	pkt->protocol = nh;
	pkt->l4_off = off;
	return mg_parse_l4(skb, pkt, end - off);
}

/* Makes the first MG_PULL_LEN bytes linear when they are not. */
static __always_inline void mg_pull(struct __sk_buff *skb)
{
	__u32 want = MG_MIN(skb->len, MG_PULL_LEN);

	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);
}

#endif /* MG_PARSE_H */
