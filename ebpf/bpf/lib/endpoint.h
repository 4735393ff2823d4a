/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The pods on this node, by the ifindex of their host-side interface, and
 * anti-spoofing: a packet from a pod must carry the pod's MAC and IP.
 *
 * An array map: the lookup is inlined by the verifier (no hash), which keeps
 * the established-flow path close to the cost of its one conntrack lookup.
 */
#ifndef MG_ENDPOINT_H
#define MG_ENDPOINT_H

#include "common.h"

#ifndef MG_ENDPOINTS_MAX
#define MG_ENDPOINTS_MAX 65536  /* highest ifindex + 1; user space may resize */
#endif

enum mg_endpoint_flags {
	MG_EP_F_VALID = 1,
	MG_EP_F_HAS_IPV4 = 2,
	MG_EP_F_HAS_IPV6 = 4,
};

struct mg_endpoint {
	__u32 identity;
	__u32 flags;      /* MG_EP_F_* */
	__u8 mac[6];
	__u8 pad[2];
	__u8 ipv4[4];
	__u8 ipv6[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct mg_endpoint);
	__uint(max_entries, MG_ENDPOINTS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_endpoints SEC(".maps");

static __always_inline const struct mg_endpoint *mg_endpoint_get(__u32 ifindex)
{
	const struct mg_endpoint *ep = bpf_map_lookup_elem(&mg_endpoints, &ifindex);

	if (!ep || !(ep->flags & MG_EP_F_VALID))
		return 0;
	return ep;
}

/* Returns MG_OK or -DROP_SPOOFED_MAC. */
static __always_inline int mg_check_mac(const struct mg_endpoint *ep, const __u8 *mac)
{
	if (*(const __u32 *)mac != *(const __u32 *)ep->mac ||
	    *(const __u16 *)(mac + 4) != *(const __u16 *)(ep->mac + 4))
		return -DROP_SPOOFED_MAC;
	return MG_OK;
}

/* Returns MG_OK or -DROP_SPOOFED_IP. */
static __always_inline int mg_check_src_ip(const struct mg_endpoint *ep, __u8 family, const __u8 *saddr)
{
	if (family == MG_FAMILY_IPV4) {
		if ((ep->flags & MG_EP_F_HAS_IPV4) && mg_addr_eq(saddr, ep->ipv4, 4))
			return MG_OK;
	} else {
		if ((ep->flags & MG_EP_F_HAS_IPV6) && mg_addr_eq(saddr, ep->ipv6, 16))
			return MG_OK;
	}
	return -DROP_SPOOFED_IP;
}

#endif /* MG_ENDPOINT_H */
