/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Events to user space through two ring buffers of the same record: drops
 * (policy and anti-spoofing, with both identities and the 5-tuple) in
 * mg_events, read by the node agent; auth-required signals (de-duplicated
 * in lib/auth.h) in mg_auth_events, read by auth-handshake. A ring buffer
 * has one consumer position, so each reader gets its own. An auth-required
 * signal also carries a copy of the frame that raised it (struct
 * mg_auth_signal), so auth-handshake can replay it through the datapath once
 * the entry is written: the first packet of a pair that was not proved ahead
 * is held, not lost to a TCP retransmit. Malformed packets are only counted: a
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

/* Longest frame an auth-required signal carries; a longer one is signalled
 * without its copy (frame_len 0) and is lost as before. */
#ifndef MG_HOLD_BYTES
#define MG_HOLD_BYTES 1536
#endif

/* The auth ring's record: the event, then the frame (Ethernet header first)
 * as the program saw it, to be replayed where it was seen. */
struct mg_auth_signal {
	struct mg_event ev;
	__u32 frame_len;         /* bytes of frame[] that are the packet; 0 when not held */
	__u32 pad;
	__u8 frame[MG_HOLD_BYTES];
};

static __always_inline void mg_event_fill(struct mg_event *ev, __u16 type, __u16 reason, __u8 dir,
					  __u32 ifindex, const struct mg_pkt *pkt, __u32 subject,
					  __u32 peer, __u32 peer_node, __u32 cookie)
{
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
}

/* Returns 0 when the event was queued. */
static __always_inline int mg_event_send(__u16 type, __u16 reason, __u8 dir, __u32 ifindex,
					 const struct mg_pkt *pkt, __u32 subject, __u32 peer,
					 __u32 peer_node, __u32 cookie)
{
	struct mg_event *ev = bpf_ringbuf_reserve(&mg_events, sizeof(*ev), 0);

	if (!ev)
		return -1;
	mg_event_fill(ev, type, reason, dir, ifindex, pkt, subject, peer, peer_node, cookie);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/* An auth-required signal with a copy of the frame. Returns 0 when queued. */
static __always_inline int mg_auth_signal_send(struct __sk_buff *skb, __u8 dir,
					       const struct mg_pkt *pkt, __u32 subject,
					       __u32 peer, __u32 peer_node, __u32 cookie)
{
	struct mg_auth_signal *sig = bpf_ringbuf_reserve(&mg_auth_events, sizeof(*sig), 0);
	__u32 len = skb->len;

	if (!sig)
		return -1;
	mg_event_fill(&sig->ev, MG_EVENT_AUTH_REQUIRED, 0, dir, skb->ifindex, pkt, subject, peer,
		      peer_node, cookie);
	sig->pad = 0;
	sig->frame_len = 0;
	if (len >= 14 && len <= MG_HOLD_BYTES &&
	    bpf_skb_load_bytes(skb, 0, sig->frame, len) == 0)
		sig->frame_len = len;
	bpf_ringbuf_submit(sig, 0);
	return 0;
}

#endif /* MG_EVENTS_H */
