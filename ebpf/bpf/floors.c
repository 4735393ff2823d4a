/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Benchmark floors: programs doing only the unavoidable work, measured in
 * the same run as the datapath (ebpf/benches/datapath.rs). They open the
 * instance's own pinned conntrack and ipcache maps, so a floor looks up the
 * very tables the datapath does.
 */
#include <linux/if_ether.h>

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/ipcache.h"
#include "lib/conntrack.h"
#include "lib/bench.h"

static __always_inline int floor_key(struct __sk_buff *skb, struct mg_ct_key *key)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_iphdr4 *ip = data + ETH_HLEN;
	__be16 *ports = (void *)(ip + 1);

	if ((void *)(ports + 2) > data_end)
		return -1;
	mg_addr_copy(key->local_addr, ip->saddr, 4);
	mg_addr_copy(key->remote_addr, ip->daddr, 4);
	key->local_port = ports[0];
	key->remote_port = ports[1];
	key->protocol = ip->protocol;
	key->family = MG_FAMILY_IPV4;
	return 0;
}

/* Nothing at all. */
SEC("classifier")
int floor_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

/* One 5-tuple lookup in the conntrack table. */
SEC("classifier")
int floor_hash(struct __sk_buff *skb)
{
	struct mg_ct_key key = {};

	if (floor_key(skb, &key))
		return TC_ACT_SHOT;
	return bpf_map_lookup_elem(&mg_ct, &key) ? TC_ACT_OK : TC_ACT_SHOT;
}

/* A trie with the ipcache's layout, sized (by the loader) like the policy
 * table, so the LPM floor is measured at the benchmark's table size. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mg_ipcache_key);
	__type(value, struct mg_ipcache_value);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} floor_trie SEC(".maps");

static __always_inline int floor_lpm_in(struct __sk_buff *skb, void *trie)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct mg_iphdr4 *ip = data + ETH_HLEN;
	struct mg_ipcache_key key = {};

	if ((void *)(ip + 1) > data_end)
		return TC_ACT_SHOT;
	key.prefixlen = MG_IPCACHE_PREFIX_BASE + 32;
	key.family = MG_FAMILY_IPV4;
	mg_addr_copy(key.addr, ip->daddr, 4);
	return bpf_map_lookup_elem(trie, &key) ? TC_ACT_OK : TC_ACT_SHOT;
}

/* One /32 lookup in a trie the size of the policy table. */
SEC("classifier")
int floor_lpm(struct __sk_buff *skb)
{
	return floor_lpm_in(skb, &floor_trie);
}

/* One /32 lookup in the instance's ipcache. */
SEC("classifier")
int floor_lpm_ipcache(struct __sk_buff *skb)
{
	return floor_lpm_in(skb, &mg_ipcache);
}

/* One conntrack-style insert of a key never seen before. */
SEC("classifier")
int floor_insert(struct __sk_buff *skb)
{
	struct mg_ct_key key = {};
	struct mg_ct_entry e = {};
	struct mg_pkt pkt = {};

	if (floor_key(skb, &key))
		return TC_ACT_SHOT;
	mg_bench_perturb(&pkt);
	key.local_port = pkt.sport;
	mg_addr_copy(key.remote_addr, pkt.daddr, 4);
	e.expires = mg_now() + 60000;
	return bpf_map_update_elem(&mg_ct, &key, &e, BPF_ANY) ? TC_ACT_SHOT : TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
