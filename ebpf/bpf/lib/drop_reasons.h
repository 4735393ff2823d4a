/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one list of reasons a packet is dropped, and of reasons it is
 * forwarded. Mirrored by `DropReason` and `ForwardReason` in the Rust crate
 * (src/abi.rs) and checked against this object's BTF by tests/abi.rs.
 *
 * Codes are stable: a retired code is commented out, never reused.
 * Counter slots are `direction * MG_CODES_PER_DIR + code`.
 */
#ifndef MG_DROP_REASONS_H
#define MG_DROP_REASONS_H

#define MG_CODES_PER_DIR 256

enum mg_fwd_reason {
	FWD_CT_ESTABLISHED = 1,   /* conntrack hit, same direction as the flow's first packet */
	FWD_CT_REPLY = 2,         /* conntrack hit, the other direction */
	FWD_POLICY_ALLOW = 3,     /* new flow admitted by an allow entry */
	FWD_AUTH_ALLOW = 4,       /* new flow admitted by an auth-required entry with a live auth entry */
	FWD_UNSELECTED = 5,       /* new flow, subject not selected by any policy in this direction */
	FWD_ARP = 6,              /* ARP (after anti-spoofing) */
	FWD_ICMPV6_ND = 7,        /* IPv6 neighbour discovery / MLD, needed for the link to work */
	FWD_CT_REEVALUATED = 8,   /* conntrack hit from an older policy revision, still allowed */
	FWD_CT_RELATED = 9,       /* ICMP error about a tracked flow */
	/* Notices: counted, never a verdict of their own. */
	NOTICE_CT_INSERT_FAILED = 100,
	NOTICE_EVENT_LOST = 101,  /* ring buffer full */
};

enum mg_drop_reason {
	DROP_UNKNOWN_L3 = 128,        /* ethertype is not IPv4, IPv6 or ARP */
	DROP_TRUNCATED_ETH = 129,
	DROP_TRUNCATED_IPV4 = 130,    /* shorter than its header */
	DROP_INVALID_IPV4 = 131,      /* bad version, IHL or total length */
	DROP_TRUNCATED_IPV6 = 132,
	DROP_INVALID_IPV6 = 133,      /* bad version or payload length */
	DROP_TRUNCATED_EXTHDR = 134,  /* IPv6 extension header runs past the packet */
	DROP_TOO_MANY_EXTHDRS = 135,  /* more than MG_MAX_EXTHDRS extension headers */
	DROP_TRUNCATED_L4 = 136,      /* TCP/UDP/SCTP/ICMP header runs past the packet */
	DROP_INVALID_L4 = 137,        /* e.g. TCP data offset below 5, UDP length below 8 */
	DROP_FRAG_NO_FIRST = 138,     /* a later fragment whose first fragment was not admitted */
	DROP_FRAG_INVALID = 139,      /* first fragment without the whole L4 header, or overlapping offset */
	DROP_SPOOFED_MAC = 140,       /* source MAC is not the pod's */
	DROP_SPOOFED_IP = 141,        /* source IP is not the pod's */
	DROP_UNKNOWN_ENDPOINT = 142,  /* interface is not in the endpoint map */
	DROP_POLICY_DENY = 143,       /* an explicit deny entry matched */
	DROP_POLICY_DEFAULT = 144,    /* subject is default-deny and nothing allowed it */
	DROP_AUTH_REQUIRED = 145,     /* auth-required and no live auth entry */
	DROP_NOT_READY = 146,         /* the datapath config was never written */
	DROP_TRUNCATED_ARP = 147,
	DROP_INVALID_ND = 148,        /* ICMPv6 ND/MLD not confined to the link (hop limit, scope) */
	DROP_SPOOFED_ORIGIN = 149,    /* a pod-range source from neither the tunnel nor the pod's interface */
	MG_DROP_REASON_MAX = 150,
};

#endif /* MG_DROP_REASONS_H */
