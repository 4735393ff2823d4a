//! Replays a frame the datapath held with an auth-required signal, at the
//! point where the datapath saw it, so it is judged again like any packet:
//! a frame seen leaving its pod (TC ingress of the pod's host-side veth)
//! re-enters that interface's receive path through an XDP program run in
//! live-frames mode (`bpf/replay.c`); a frame seen going to its pod (TC
//! egress) is sent out of the interface through a packet socket, which
//! takes the transmit path, TC egress included. Nothing here can let a
//! frame past policy: without a live auth entry it is dropped again.
//!
//! A frame sent by a socket on the node has no ingress interface, and the
//! datapath drops one with a pod source going to a pod unless it came out
//! of the tunnel or a pod (`bpf/lib/origin.h`): so each frame replayed to a
//! pod carries a random one-time mark, written to `mg_replay_marks` with
//! the interface it is for just for the duration of the send.
//!
//! A pod's own packets leave it with their TCP or UDP checksum only
//! partial (CHECKSUM_PARTIAL: veth offloads it, the stack completes it on
//! the way out of the node); a copy sent again as a fresh frame would be
//! checked as is and discarded, so the replay completes it first.
//!
//! Runs in the node's network namespace (where the host-side veths are);
//! loading the program needs CAP_BPF.

use std::os::fd::AsFd;

use aya::Ebpf;
use aya::maps::{HashMap, Map, MapData};
use aya::programs::Xdp;

use crate::datapath::{DatapathError, map_err};
use crate::pin::PinLayout;
use crate::policy::Direction;
use crate::sys;
use crate::{abi, objects};

const PROG: &str = "mg_replay";

/// The loaded replay program.
pub struct Replayer {
    obj: Ebpf,
    marks: std::sync::Mutex<HashMap<MapData, u32, u32>>,
}

impl Replayer {
    /// Loads `mg_replay` (not attached anywhere; it only runs on demand)
    /// and opens the replay marks of the datapath pinned at `pin`.
    pub fn load(pin: &PinLayout) -> Result<Self, DatapathError> {
        let path = pin.map(abi::MAP_REPLAY_MARKS);
        let data = MapData::from_pin(&path).map_err(map_err(abi::MAP_REPLAY_MARKS))?;
        let marks = HashMap::try_from(Map::HashMap(data)).map_err(map_err(abi::MAP_REPLAY_MARKS))?;
        let mut obj = Ebpf::load(objects::REPLAY).map_err(|e| DatapathError::Load(Box::new(e)))?;
        let prog: &mut Xdp = obj
            .program_mut(PROG)
            .ok_or(DatapathError::BugMissing { what: "program", name: PROG.to_owned() })?
            .try_into()
            .map_err(|source| DatapathError::Program { name: PROG.to_owned(), source })?;
        prog.load().map_err(|source| DatapathError::Program { name: PROG.to_owned(), source })?;
        Ok(Self { obj, marks: std::sync::Mutex::new(marks) })
    }

    /// Replays `frame` (Ethernet header first) where the datapath saw it:
    /// `direction` and `ifindex` as the signal gave them.
    pub fn replay(&self, direction: Direction, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        let mut frame = frame.to_vec();
        complete_checksum(&mut frame);
        let frame = frame.as_slice();
        match direction {
            // The pod's egress policy runs at TC ingress: receive it again.
            Direction::Egress => {
                let prog: &Xdp = self
                    .obj
                    .program(PROG)
                    .and_then(|p| p.try_into().ok())
                    .ok_or_else(|| std::io::Error::other("mg_replay is not loaded"))?;
                let fd = prog.fd().map_err(std::io::Error::other)?;
                sys::xdp_live_run(fd.as_fd(), ifindex, frame)
            }
            // The pod's ingress policy runs at TC egress: transmit it again.
            Direction::Ingress => {
                let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
                let mark = loop {
                    let m = rand::random::<u32>();
                    if m != 0 {
                        break m;
                    }
                };
                marks.insert(mark, ifindex, 0).map_err(std::io::Error::other)?;
                let sent = sys::packet_send(ifindex, frame, mark);
                // The send ran the interface's TC egress synchronously: the
                // mark is spent either way.
                let _ = marks.remove(&mark);
                sent
            }
        }
    }
}

/// Writes the full TCP or UDP checksum into `frame` (Ethernet first), over
/// whatever partial sum it carries. Other protocols, fragments and frames
/// that do not parse are left alone; so is an IPv4 UDP checksum of 0 (none).
pub fn complete_checksum(frame: &mut [u8]) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let fix = {
        let Ok(p) = SlicedPacket::from_ethernet(frame) else { return };
        let base = frame.as_ptr() as usize;
        match (p.net, p.transport) {
            (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) => t
                .calc_checksum_ipv4(ip.header().source(), ip.header().destination())
                .ok()
                .map(|c| (t.slice().as_ptr() as usize - base + 16, c)),
            (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Tcp(t))) => t
                .calc_checksum_ipv6(ip.header().source(), ip.header().destination())
                .ok()
                .map(|c| (t.slice().as_ptr() as usize - base + 16, c)),
            (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) if u.checksum() != 0 => u
                .to_header()
                .calc_checksum_ipv4_raw(ip.header().source(), ip.header().destination(), u.payload())
                .ok()
                .map(|c| (u.slice().as_ptr() as usize - base + 6, c)),
            (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Udp(u))) => u
                .to_header()
                .calc_checksum_ipv6_raw(ip.header().source(), ip.header().destination(), u.payload())
                .ok()
                .map(|c| (u.slice().as_ptr() as usize - base + 6, c)),
            _ => None,
        }
    };
    if let Some((at, sum)) = fix {
        frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::complete_checksum;
    use etherparse::PacketBuilder;

    fn frame(v6: bool, tcp: bool) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let b = if v6 { b.ipv6([0xfd; 16], [0xfe; 16], 64) } else { b.ipv4([10, 244, 1, 10], [10, 244, 2, 10], 64) };
        let payload = b"first packet";
        let mut out = Vec::new();
        if tcp {
            b.tcp(40000, 7000, 1, 64240).syn().write(&mut out, payload).unwrap();
        } else {
            b.udp(40000, 7000).write(&mut out, payload).unwrap();
        }
        out
    }

    #[test]
    fn a_partial_checksum_is_completed_and_a_full_one_kept() {
        for (v6, tcp) in [(false, true), (true, true), (false, false), (true, false)] {
            let good = frame(v6, tcp);
            let at = good.len() - b"first packet".len() - if tcp { 20 - 16 } else { 8 - 6 };
            // As a pod sends it: a partial sum (here, garbage) in the field.
            let mut partial = good.clone();
            partial[at..at + 2].copy_from_slice(&[0x12, 0x34]);
            complete_checksum(&mut partial);
            assert_eq!(partial, good, "v6={v6} tcp={tcp}");
            let mut same = good.clone();
            complete_checksum(&mut same);
            assert_eq!(same, good);
        }
    }

    #[test]
    fn frames_it_cannot_parse_are_left_alone() {
        let mut short = vec![0u8; 20];
        complete_checksum(&mut short);
        assert_eq!(short, vec![0u8; 20]);
        let mut no_sum = frame(false, false);
        let n = no_sum.len();
        no_sum[n - 12 - 2..n - 12].copy_from_slice(&[0, 0]);
        let before = no_sum.clone();
        complete_checksum(&mut no_sum);
        assert_eq!(no_sum, before, "IPv4 UDP without a checksum stays without");
    }
}
