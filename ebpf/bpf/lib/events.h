/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Events to user space through two ring buffers of the same record: drops
 * (policy and anti-spoofing, with both identities and the 5-tuple) in
 * mg_events, read by the node agent; auth-required signals (de-duplicated
 * in lib/auth.h) in mg_auth_events, read by auth-handshake. A ring buffer
 * has one consumer position, so each reader gets its own. Malformed packets are only counted: a
 * flood of garbage must not push the events that matter out of the ring.
 * A full ring loses the event and counts NOTICE_EVENT_LOST.
 */
#ifndef MG_EVENTS_H
#define MG_EVENTS_H

#include "common.h"
#include "parse.h"

#ifndef MG_EVENTS_BYTES
#define MG_EVENTS_BYTES (256 * 1024)
#endif

enum mg_event_type {
	MG_EVENT_DROP = 1,
	MG_EVENT_AUTH_REQUIRED = 2,
	MG_EVENT_FLOW = 3,       /* a new flow admitted: once per conntrack entry, reason FWD_* */
};

struct mg_event {
	__u64 timestamp_ns;      /* CLOCK_BOOTTIME */
	__u16 type;              /* MG_EVENT_* */
	__u16 reason;            /* DROP_* for drops, FWD_* for flows, else 0 */
	__u8 direction;          /* MG_DIR_* */
	__u8 family;             /* MG_FAMILY_*, 0 when not parsed */
	__u8 protocol;
	__u8 pad;
	__u32 ifindex;
	__u32 subject_identity;  /* the pod's */
	__u32 peer_identity;
	__u32 peer_node;
	__u32 cookie;            /* the policy entry's, for explicit denies */
	__u8 saddr[16] MG_ADDR_ALIGN;
	__u8 daddr[16] MG_ADDR_ALIGN;
	__be16 sport;
	__be16 dport;
	__u32 pad2;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MG_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MG_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_auth_events SEC(".maps");

/* Returns 0 when the event was queued. */
static __always_inline int mg_event_send(__u16 type, __u16 reason, __u8 dir, __u32 ifindex,
					 const struct mg_pkt *pkt, __u32 subject, __u32 peer,
					 __u32 peer_node, __u32 cookie)
{
	struct mg_event *ev = type == MG_EVENT_AUTH_REQUIRED
				      ? bpf_ringbuf_reserve(&mg_auth_events, sizeof(*ev), 0)
				      : bpf_ringbuf_reserve(&mg_events, sizeof(*ev), 0);

	if (!ev)
		return -1;
	ev->timestamp_ns = bpf_ktime_get_boot_ns();
	ev->type = type;
	ev->reason = reason;
	ev->direction = dir;
	ev->family = pkt->family;
	ev->protocol = pkt->protocol;
	ev->pad = 0;
	ev->ifindex = ifindex;
	ev->subject_identity = subject;
	ev->peer_identity = peer;
	ev->peer_node = peer_node;
	ev->cookie = cookie;
	mg_addr_copy(ev->saddr, pkt->saddr, 16);
	mg_addr_copy(ev->daddr, pkt->daddr, 16);
	ev->sport = pkt->sport;
	ev->dport = pkt->dport;
	ev->pad2 = 0;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

#endif /* MG_EVENTS_H */
