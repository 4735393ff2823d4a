/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Benchmark-only (built into meshguard_bench.o and floors.o, never into the
 * datapath object): makes every BPF_PROG_TEST_RUN repetition a new flow.
 * A shared counter picks the source port (32768 per peer) and the
 * destination, one of `peers` consecutive IPv4 addresses from `base_v4`,
 * so the flow keys never repeat while the counter stays below
 * peers * 32768. The counter is atomic so runs on different CPUs never
 * reuse a key. The fast path (which runs first and must miss, as it does
 * for any new flow) peeks at the same key the full path then takes.
 * Benchmarks use the egress direction: local = source.
 */
#ifndef MG_BENCH_H
#define MG_BENCH_H

#include "common.h"
#include "parse.h"
#include "conntrack.h"

struct mg_bench_cfg {
	__u64 counter;
	__u32 base_v4;   /* host order */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct mg_bench_cfg);
	__uint(max_entries, 1);
} mg_bench SEC(".maps");

static __always_inline void mg_bench_perturb(struct mg_pkt *pkt)
{
	__u32 zero = 0;
	struct mg_bench_cfg *b = bpf_map_lookup_elem(&mg_bench, &zero);
	__u64 c;
	__u32 daddr;

	if (!b)
		return;
	c = __sync_fetch_and_add(&b->counter, 1);
	pkt->sport = bpf_htons(1024 + (__u16)(c & 0x7fff));
	daddr = bpf_htonl(b->base_v4 + (__u32)(c >> 15));
	mg_addr_copy(pkt->daddr, (const __u8 *)&daddr, 4);
}

static __always_inline void mg_bench_peek_key(struct mg_ct_key *key)
{
	__u32 zero = 0;
	struct mg_bench_cfg *b = bpf_map_lookup_elem(&mg_bench, &zero);
	__u32 daddr;
	__u64 c;

	if (!b)
		return;
	c = b->counter;
	key->local_port = bpf_htons(1024 + (__u16)(c & 0x7fff));
	daddr = bpf_htonl(b->base_v4 + (__u32)(c >> 15));
	*(__u32 *)key->remote_addr = daddr;
}

#endif /* MG_BENCH_H */
