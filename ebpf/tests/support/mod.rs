//! Shared by the root-only tests: a datapath instance with its own pin root
//! (removed on drop), one pod on ifindex 1 (the loopback device that
//! BPF_PROG_TEST_RUN runs packets on), and verdicts read from the counters.

#![allow(dead_code)]

pub mod packet;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use meshguard_ebpf::abi::{Code, DropReason, ForwardReason};
use meshguard_ebpf::policy::Direction;
use meshguard_ebpf::{Counters, Datapath, DatapathApi, DatapathConfig, MapSizes, PinLayout, PodEndpoint};

pub use packet::*;

/// BPF_PROG_TEST_RUN runs TC programs on the loopback device.
pub const TEST_IFINDEX: u32 = 1;

pub const POD_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
pub const POD_ID: u32 = 1000;
pub const PEER_ID: u32 = 2000;
pub const OTHER_ID: u32 = 3000;
pub const PEER_NODE: u32 = 7;

pub fn pod_v4() -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10)
}
pub fn peer_v4() -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 2, 20)
}
pub fn other_v4() -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 3, 30)
}
pub fn pod_v6() -> Ipv6Addr {
    "fd00:244:1::10".parse().unwrap()
}
pub fn peer_v6() -> Ipv6Addr {
    "fd00:244:2::20".parse().unwrap()
}

/// A single address as an ipcache prefix.
pub fn host(a: impl Into<std::net::IpAddr>) -> ipnet::IpNet {
    ipnet::IpNet::from(a.into())
}

/// Fails (never skips) without root: these tests load eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and needs root (CAP_BPF, CAP_NET_ADMIN); run it as root: sudo -E cargo test -p meshguard-ebpf"
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh pin root: whatever a crashed run with the same pid left is removed.
pub fn test_pin(name: &str) -> PinLayout {
    let pin = PinLayout::new(format!("/sys/fs/bpf/meshguard-test/{}-{}-{}", name, std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let _ = pin.remove();
    pin
}

pub fn small_config(pin: PinLayout) -> DatapathConfig {
    let mut cfg = DatapathConfig::new(pin, 1);
    cfg.sizes = MapSizes { endpoints: 64, ipcache: 1024, policy: 4096, subjects: 1024, auth: 1024, conntrack: 4096, fragments: 256 };
    cfg
}

/// A datapath instance for one test; removed (unpinned) on drop.
pub struct Harness {
    pub dp: Option<Datapath>,
    pub pin: PinLayout,
}

impl Harness {
    pub fn new(name: &str) -> Self {
        require_root();
        let pin = test_pin(name);
        let dp = Datapath::load_or_adopt(&small_config(pin.clone())).unwrap_or_else(|e| {
            let _ = pin.remove();
            panic!("load datapath: {e}")
        });
        Self { dp: Some(dp), pin }
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().unwrap()
    }

    /// The pod under test, with IPv4 and IPv6, on the test interface.
    pub fn with_pod(mut self) -> Self {
        let pod = PodEndpoint { identity: POD_ID, mac: POD_MAC, ipv4: Some(pod_v4()), ipv6: Some(pod_v6()) };
        self.dp().set_endpoint(TEST_IFINDEX, &pod).unwrap();
        self.dp()
            .set_ipcache(&[
                (host(peer_v4()), meshguard_ebpf::IpcacheEntry { identity: PEER_ID, node_id: PEER_NODE }),
                (host(other_v4()), meshguard_ebpf::IpcacheEntry { identity: OTHER_ID, node_id: PEER_NODE }),
                (host(peer_v6()), meshguard_ebpf::IpcacheEntry { identity: PEER_ID, node_id: PEER_NODE }),
                (host(pod_v4()), meshguard_ebpf::IpcacheEntry { identity: POD_ID, node_id: 1 }),
            ])
            .unwrap();
        self
    }

    fn counters(&self) -> Counters {
        self.dp.as_ref().unwrap().counters().unwrap()
    }

    /// Runs one frame through a direction and returns the verdict's code.
    pub fn run(&mut self, dir: Direction, frame: &[u8]) -> Code {
        self.try_run(dir, frame).expect("BPF_PROG_TEST_RUN")
    }

    /// As `run`, but returns the kernel's refusal of a frame (EINVAL for
    /// frames its test runner will not build an skb from).
    pub fn try_run(&mut self, dir: Direction, frame: &[u8]) -> std::io::Result<Code> {
        self.try_run_ctx(dir, frame, meshguard_ebpf::sys::SkbCtx::default())
    }

    /// As `run`, with the packet's `__sk_buff` fields (ingress interface, mark).
    pub fn run_ctx(&mut self, dir: Direction, frame: &[u8], ctx: meshguard_ebpf::sys::SkbCtx) -> Code {
        self.try_run_ctx(dir, frame, ctx).expect("BPF_PROG_TEST_RUN")
    }

    pub fn try_run_ctx(&mut self, dir: Direction, frame: &[u8], ctx: meshguard_ebpf::sys::SkbCtx) -> std::io::Result<Code> {
        let before = self.counters();
        let dp = self.dp.as_ref().unwrap();
        let fd = dp.program_fd(dir == Direction::Egress).unwrap();
        let r = meshguard_ebpf::sys::test_run_skb(fd, frame, 1, ctx)?;
        let after = self.counters();
        let changed: Vec<Code> = after
            .iter()
            .filter(|((d, c), v)| {
                *d == dir && !matches!(c, Code::Forward(f) if f.code() >= 100) && before.get(&(*d, *c)).map_or(0, |b| b.packets) < v.packets
            })
            .map(|((_, c), _)| *c)
            .collect();
        assert_eq!(changed.len(), 1, "expected exactly one verdict counter to move, got {changed:?}");
        let code = changed[0];
        let want_ret = if matches!(code, Code::Drop(_)) { 2 } else { 0 };
        assert_eq!(r.retval, want_ret, "TC return value disagrees with the counted verdict {code}");
        Ok(code)
    }

    /// A packet the pod sends.
    pub fn egress(&mut self, p: &Packet) -> Code {
        self.run(Direction::Egress, &p.build())
    }

    /// A packet to the pod.
    pub fn ingress(&mut self, p: &Packet) -> Code {
        self.run(Direction::Ingress, &p.build())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            drop(dp);
        }
        let _ = self.pin.remove();
        // The shared parent goes when the last test leaves it (fails while not empty).
        if let Some(parent) = self.pin.root().parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

pub fn fwd(r: ForwardReason) -> Code {
    Code::Forward(r)
}

pub fn drop_(r: DropReason) -> Code {
    Code::Drop(r)
}

/// A frame from the pod: its MAC, its address.
pub fn from_pod_v4() -> Packet {
    Packet::new(pod_v4(), peer_v4()).src_mac(POD_MAC)
}
pub fn to_pod_v4() -> Packet {
    Packet::new(peer_v4(), pod_v4())
}
pub fn from_pod_v6() -> Packet {
    Packet::new(pod_v6(), peer_v6()).src_mac(POD_MAC)
}
pub fn to_pod_v6() -> Packet {
    Packet::new(peer_v6(), pod_v6())
}
