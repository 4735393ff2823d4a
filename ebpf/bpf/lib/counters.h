/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-CPU counters by direction and code (FWD_*, NOTICE_* or DROP_*): slot
 * = direction * MG_CODES_PER_DIR + code. User space sums over CPUs.
 */
#ifndef MG_COUNTERS_H
#define MG_COUNTERS_H

#include "common.h"

#define MG_COUNTER_SLOTS (MG_DIR_MAX * MG_CODES_PER_DIR)

struct mg_counter {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct mg_counter);
	__uint(max_entries, MG_COUNTER_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_counters SEC(".maps");

static __always_inline void mg_count(__u8 dir, __u32 code, __u32 bytes)
{
	__u32 slot = (__u32)(dir & 1) * MG_CODES_PER_DIR + (code & (MG_CODES_PER_DIR - 1));
	struct mg_counter *c = bpf_map_lookup_elem(&mg_counters, &slot);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

#endif /* MG_COUNTERS_H */
