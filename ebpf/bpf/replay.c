/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Replays a held frame into a host-side veth as if the pod had sent it
 * again: auth-handshake runs this with BPF_PROG_TEST_RUN in live-frames
 * mode (BPF_F_TEST_XDP_LIVE_FRAMES) and the veth's ifindex, and XDP_PASS
 * hands the frame to the interface's receive path, where the datapath's TC
 * ingress program judges it like any other packet. Nothing is bypassed:
 * a frame replayed without its auth entry is dropped again.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int mg_replay(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
