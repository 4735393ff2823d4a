/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Includes, helpers and conventions shared by every meshguard header.
 *
 * Return convention (as Cilium's bpf/): a function that decides about a
 * packet returns MG_OK (0) to continue, a positive FWD_* reason when the
 * packet is to be forwarded and no later stage needs to run, or a negative
 * DROP_* reason (lib/drop_reasons.h) when it must be dropped. The entry
 * points turn that into TC_ACT_OK / TC_ACT_SHOT and count it.
 */
#ifndef MG_COMMON_H
#define MG_COMMON_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "drop_reasons.h"

#define MG_OK 0

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define MG_MIN(a, b) ((a) < (b) ? (a) : (b))

/* Address families as the datapath writes them (not AF_*). */
enum mg_family {
	MG_FAMILY_IPV4 = 4,
	MG_FAMILY_IPV6 = 6,
};

/* The pod's point of view: "to pod" is the pod's ingress policy (TC egress
 * of its host-side veth), "from pod" its egress policy (TC ingress). */
enum mg_direction {
	MG_DIR_INGRESS = 0,
	MG_DIR_EGRESS = 1,
	MG_DIR_MAX = 2,
};

/* Reserved numeric identities. Workload identities come from the cluster
 * view and are never below MG_IDENTITY_MIN_WORKLOAD. 0 never names a real
 * identity: in a policy key it is the wildcard. */
enum mg_reserved_identity {
	MG_IDENTITY_ANY = 0,
	MG_IDENTITY_HOST = 1,
	MG_IDENTITY_WORLD = 2,
	MG_IDENTITY_MIN_WORKLOAD = 256,
};

/* Address arrays are 4-byte aligned so copies and compares are word-wide:
 * a u8[16] copy with alignment 1 would cost sixteen byte moves. */
#define MG_ADDR_ALIGN __attribute__((aligned(4)))

/* Now, in jiffies: bpf_jiffies64() is inlined by the verifier on 64-bit
 * JITs (a single load), where a ktime helper is a call costing as much as
 * the whole conntrack lookup. Conntrack and fragment ages use it. */
static __always_inline __u64 mg_now(void)
{
	return bpf_jiffies64();
}

static __always_inline int mg_addr_eq(const __u8 *a, const __u8 *b, int len)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	if (len == 4)
		return x[0] == y[0];
	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

static __always_inline void mg_addr_copy(__u8 *dst, const __u8 *src, int len)
{
	__u32 *d = (__u32 *)dst;
	const __u32 *s = (const __u32 *)src;

	d[0] = s[0];
	if (len > 4) {
		d[1] = s[1];
		d[2] = s[2];
		d[3] = s[3];
	}
}

#endif /* MG_COMMON_H */
