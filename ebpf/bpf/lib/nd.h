/* SPDX-License-Identifier: Apache-2.0 */
/*
 * IPv6 neighbour discovery and MLD: the link needs them, so they pass
 * without policy, but only as what they are — control traffic that cannot
 * leave the link. Anything else carrying those ICMPv6 types would be a
 * channel past policy, so it is dropped (DROP_INVALID_ND), never judged as
 * ordinary ICMPv6.
 *
 *  - ND (RS, RA, NS, NA, redirect; RFC 4861 6.1, 7.1.1): hop limit 255, so it
 *    was not routed, and addressed within the link: a link-local or
 *    link-scope multicast destination, or a link-local (or unspecified)
 *    source, which no router forwards (the host's unicast NUD probe to a
 *    pod's own address).
 *  - MLD (query, v1 report and done, v2 report; RFC 2710 3, RFC 3810 5):
 *    hop limit 1 to a multicast destination, from a link-local source (a v2
 *    report may come from :: during address configuration).
 *
 * Returns MG_OK or -DROP_INVALID_ND.
 */
#ifndef MG_ND_H
#define MG_ND_H

#include "common.h"

/* Included by parse.h once struct mg_pkt is defined. */

static __always_inline int mg_ipv6_link_local(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

static __always_inline int mg_ipv6_unspecified(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return (w[0] | w[1] | w[2] | w[3]) == 0;
}

/* ff02::/16 and ff01::/16 (link- and interface-local multicast scopes). */
static __always_inline int mg_ipv6_link_multicast(const __u8 *a)
{
	return a[0] == 0xff && ((a[1] & 0x0f) == 0x02 || (a[1] & 0x0f) == 0x01);
}

/* A global (non-inlined) BPF function: the verifier checks it once, on its
 * own, instead of once per parser path reaching it — inlined, its branches
 * multiply the IPv6 extension-header walk's states past the verifier's
 * one-million-instruction budget. It checks its own arguments. */
__attribute__((noinline)) int mg_nd_on_link(const struct mg_pkt *pkt)
{
	if (!pkt)
		return -DROP_INVALID_ND;
	const __u8 *src = pkt->saddr, *dst = pkt->daddr;
	__u8 type = pkt->icmp_type;

	if (type == 130 || type == 131 || type == 132 || type == 143) {
		if (pkt->hop_limit != 1 || dst[0] != 0xff)
			return -DROP_INVALID_ND;
		if (mg_ipv6_link_local(src) || (type == 143 && mg_ipv6_unspecified(src)))
			return MG_OK;
		return -DROP_INVALID_ND;
	}
	if (pkt->hop_limit != 255)
		return -DROP_INVALID_ND;
	if (mg_ipv6_link_local(dst) || mg_ipv6_link_multicast(dst) ||
	    mg_ipv6_link_local(src) || mg_ipv6_unspecified(src))
		return MG_OK;
	return -DROP_INVALID_ND;
}

#endif /* MG_ND_H */
