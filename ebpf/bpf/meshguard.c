/* SPDX-License-Identifier: Apache-2.0 */
/*
 * meshguard's pod datapath: attached to a pod's host-side veth with TC
 * (TCX when the kernel has it), one program per direction. Everything else
 * is in lib/ (pipeline.h for the order of things).
 */
#include "lib/pipeline.h"
#include "lib/clock.h"

/* TC ingress of the host veth: packets the pod sends (its egress policy,
 * anti-spoofing). */
SEC("classifier")
int mg_from_pod(struct __sk_buff *skb)
{
	return mg_handle(skb, MG_DIR_EGRESS);
}

/* TC egress of the host veth: packets to the pod (its ingress policy). */
SEC("classifier")
int mg_to_pod(struct __sk_buff *skb)
{
	return mg_handle(skb, MG_DIR_INGRESS);
}

/* TC egress of the WireGuard tunnel device: what may enter the tunnel
 * with a pod source (lib/origin.h). */
SEC("classifier")
int mg_to_tunnel(struct __sk_buff *skb)
{
	return mg_handle_tunnel(skb);
}

/* Run by user space (BPF_PROG_TEST_RUN), never attached: samples jiffies. */
SEC("classifier")
int mg_clock_now(struct __sk_buff *skb)
{
	return mg_clock_sample();
}

char _license[] SEC("license") = "GPL";
