/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The datapath's clock seen from user space. Conntrack and fragment ages
 * are in jiffies (mg_now()), which user space cannot read directly: it runs
 * mg_clock through BPF_PROG_TEST_RUN, which stores the current jiffies here.
 */
#ifndef MG_CLOCK_H
#define MG_CLOCK_H

#include "common.h"

struct mg_clock {
	__u64 jiffies;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct mg_clock);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_clock SEC(".maps");

static __always_inline int mg_clock_sample(void)
{
	__u32 zero = 0;
	struct mg_clock *c = bpf_map_lookup_elem(&mg_clock, &zero);

	if (c)
		c->jiffies = mg_now();
	return 0;
}

#endif /* MG_CLOCK_H */
