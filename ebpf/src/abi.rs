//! The kernel/user ABI, mirrored from the C headers under `bpf/lib/`.
//!
//! Every struct here is `#[repr(C)]`, `Copy` and `aya::Pod`, and every
//! constant carries its C name; `tests/abi.rs` checks sizes, field offsets
//! and enum values against the BTF of the compiled `bpf/abi.c`, so a change
//! on one side that is not made on the other fails the build's tests.
//! Map names, pin layout and event codes live here and nowhere else.

// `unsafe impl Pod` is this module's only unsafe: see the SAFETY note there.
#![allow(unsafe_code)]

use std::fmt;

// === map and program names (the C symbol names) ===

pub const MAP_CONFIG: &str = "mg_config";
pub const MAP_ENDPOINTS: &str = "mg_endpoints";
pub const MAP_IPCACHE: &str = "mg_ipcache";
pub const MAP_POLICY: &str = "mg_policy";
pub const MAP_SUBJECTS: &str = "mg_subjects";
pub const MAP_AUTH: &str = "mg_auth";
pub const MAP_AUTH_SIGNAL: &str = "mg_auth_sig";
pub const MAP_CT: &str = "mg_ct";
pub const MAP_FRAG: &str = "mg_frag";
pub const MAP_COUNTERS: &str = "mg_counters";
/// Drop events (the node agent reads them).
pub const MAP_EVENTS: &str = "mg_events";
/// Auth-required signals (auth-handshake reads them).
pub const MAP_AUTH_EVENTS: &str = "mg_auth_events";
pub const MAP_CLOCK: &str = "mg_clock";
/// The cluster's pod ranges: where a pod source must come from (`bpf/lib/origin.h`).
pub const MAP_POD_RANGES: &str = "mg_pod_ranges";
/// One-time marks of frames auth-handshake replays to a pod.
pub const MAP_REPLAY_MARKS: &str = "mg_replay_marks";
/// Benchmark objects only (not pinned).
pub const MAP_BENCH: &str = "mg_bench";

/// Every pinned map of an instance.
pub const PINNED_MAPS: &[&str] = &[
    MAP_CONFIG,
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_POLICY,
    MAP_SUBJECTS,
    MAP_AUTH,
    MAP_AUTH_SIGNAL,
    MAP_CT,
    MAP_FRAG,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_AUTH_EVENTS,
    MAP_CLOCK,
    MAP_POD_RANGES,
    MAP_REPLAY_MARKS,
];

/// TC ingress of the pod's host-side interface: what the pod sends.
pub const PROG_FROM_POD: &str = "mg_from_pod";
/// TC egress of the pod's host-side interface: what the pod receives.
pub const PROG_TO_POD: &str = "mg_to_pod";
/// TC egress of the WireGuard tunnel device: what may enter the tunnel.
pub const PROG_TO_TUNNEL: &str = "mg_to_tunnel";
/// Never attached: run through BPF_PROG_TEST_RUN to sample the datapath's jiffies.
pub const PROG_CLOCK: &str = "mg_clock_now";

pub const PROG_FLOOR_EMPTY: &str = "floor_empty";
pub const PROG_FLOOR_HASH: &str = "floor_hash";
pub const PROG_FLOOR_LPM: &str = "floor_lpm";
pub const PROG_FLOOR_LPM_IPCACHE: &str = "floor_lpm_ipcache";
pub const PROG_FLOOR_INSERT: &str = "floor_insert";
/// The floor objects' own trie (`bpf/floors.c`).
pub const MAP_FLOOR_TRIE: &str = "floor_trie";

// === pin layout, below an instance's pin root ===

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The default parent of instance pin roots: `<BPFFS>/meshguard/<instance>`.
pub const DEFAULT_PIN_PARENT: &str = "/sys/fs/bpf/meshguard";
pub const PIN_MAPS_DIR: &str = "maps";
pub const PIN_PROGS_DIR: &str = "progs";
/// TCX links, one file per interface and direction: `<ifindex>-<program>`.
pub const PIN_LINKS_DIR: &str = "links";

// === enums and flags (C enumerator names) ===

pub const MG_FAMILY_IPV4: u8 = 4;
pub const MG_FAMILY_IPV6: u8 = 6;

pub const MG_DIR_INGRESS: u8 = 0;
pub const MG_DIR_EGRESS: u8 = 1;
pub const MG_DIR_MAX: usize = 2;

pub const MG_IDENTITY_ANY: u32 = 0;
pub const MG_IDENTITY_HOST: u32 = 1;
pub const MG_IDENTITY_WORLD: u32 = 2;
pub const MG_IDENTITY_MIN_WORKLOAD: u32 = 256;

pub const MG_CT_TIMEOUT_TCP_SYN: usize = 0;
pub const MG_CT_TIMEOUT_TCP_EST: usize = 1;
pub const MG_CT_TIMEOUT_TCP_CLOSE: usize = 2;
pub const MG_CT_TIMEOUT_UDP: usize = 3;
pub const MG_CT_TIMEOUT_SCTP: usize = 4;
pub const MG_CT_TIMEOUT_ICMP: usize = 5;
pub const MG_CT_TIMEOUT_OTHER: usize = 6;
pub const MG_CT_TIMEOUT_MAX: usize = 7;

pub const MG_CFG_F_READY: u32 = 1;

pub const MG_SUBJ_F_DEFAULT_DENY: u32 = 1;
pub const MG_SUBJ_F_EXACT_PEERS: u32 = 2;
pub const MG_SUBJ_F_ANY_PEER: u32 = 4;

pub const MG_EP_F_VALID: u32 = 1;
pub const MG_EP_F_HAS_IPV4: u32 = 2;
pub const MG_EP_F_HAS_IPV6: u32 = 4;

pub const MG_CT_F_EGRESS: u16 = 1;
pub const MG_CT_F_REPLY_SEEN: u16 = 2;
pub const MG_CT_F_CLOSING: u16 = 4;
pub const MG_CT_F_AUTH: u16 = 8;

pub const MG_ACTION_NONE: u8 = 0;
pub const MG_ACTION_ALLOW: u8 = 1;
pub const MG_ACTION_AUTH: u8 = 2;
pub const MG_ACTION_DENY: u8 = 3;

pub const MG_EVENT_DROP: u16 = 1;
pub const MG_EVENT_AUTH_REQUIRED: u16 = 2;
pub const MG_EVENT_FLOW: u16 = 3;

/// Policy trie prefix lengths (bits of key data, `bpf/lib/policy.h`).
pub const MG_POLICY_PREFIX_ANY_PROTO: u32 = 72;
pub const MG_POLICY_PREFIX_ANY_PORT: u32 = 80;
pub const MG_POLICY_PREFIX_FULL: u32 = 96;
/// The ipcache key's family and padding bits, always in the prefix.
pub const MG_IPCACHE_PREFIX_BASE: u32 = 32;

/// Counter slots: `direction * MG_CODES_PER_DIR + code`.
pub const MG_CODES_PER_DIR: u32 = 256;
pub const MG_COUNTER_SLOTS: u32 = MG_DIR_MAX as u32 * MG_CODES_PER_DIR;

// === shared structs ===

/// `struct mg_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    pub policy_revision: u32,
    pub local_node_id: u32,
    pub any_subject_flags: [u32; MG_DIR_MAX],
    /// The kernel's HZ: jiffies per second.
    pub hz: u32,
    /// Jiffies.
    pub ct_timeout: [u64; MG_CT_TIMEOUT_MAX],
    pub auth_signal_interval_ns: u64,
    /// The tunnel device's index (0: not guarded yet).
    pub tunnel_ifindex: u32,
    pub pad: u32,
}

/// `struct mg_endpoint`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub identity: u32,
    pub flags: u32,
    pub mac: [u8; 6],
    pub pad: [u8; 2],
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
}

/// `struct mg_ipcache_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// The part of [`IpcacheKey`] after `prefixlen`, as aya's `lpm_trie::Key` wants it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheKeyData {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// `struct mg_ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub node_id: u32,
}

/// `struct mg_policy_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub subject: u32,
    pub peer: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network byte order.
    pub port: u16,
}

/// The part of [`PolicyKey`] after `prefixlen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyData {
    pub subject: u32,
    pub peer: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network byte order.
    pub port: u16,
}

/// `struct mg_policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub action: u8,
    pub pad: [u8; 3],
    pub cookie: u32,
}

/// `struct mg_subject_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubjectKey {
    pub identity: u32,
    pub direction: u32,
}

/// `struct mg_subject_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubjectValue {
    pub flags: u32,
}

/// `struct mg_auth_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthKey {
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node: u32,
    pub pad: u32,
}

/// `struct mg_auth_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthValue {
    /// CLOCK_BOOTTIME nanoseconds.
    pub expires_boot_ns: u64,
}

/// `struct mg_ct_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// `struct mg_ct_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Jiffies.
    pub expires: u64,
    pub policy_revision: u32,
    pub peer_identity: u32,
    pub peer_node: u32,
    pub policy_port: u16,
    pub flags: u16,
}

/// `struct mg_frag_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// `struct mg_frag_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Jiffies.
    pub created: u64,
    pub sport: u16,
    pub dport: u16,
    pub policy_port: u16,
    pub protocol: u8,
    pub pad: u8,
}

/// `struct mg_event`, as it comes out of the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    pub timestamp_ns: u64,
    pub r#type: u16,
    pub reason: u16,
    pub direction: u8,
    pub family: u8,
    pub protocol: u8,
    pub pad: u8,
    pub ifindex: u32,
    pub subject_identity: u32,
    pub peer_identity: u32,
    pub peer_node: u32,
    pub cookie: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub pad2: u32,
}

/// `MG_HOLD_BYTES`: the longest frame an auth-required signal carries.
pub const MG_HOLD_BYTES: usize = 1536;

/// `struct mg_auth_signal`: the auth ring's record, an event and the frame
/// that raised it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthSignal {
    pub ev: RawEvent,
    /// Bytes of `frame` that are the packet; 0 when it was too long to hold.
    pub frame_len: u32,
    pub pad: u32,
    pub frame: [u8; MG_HOLD_BYTES],
}

/// `struct mg_counter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct mg_clock`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub jiffies: u64,
}

/// `struct mg_bench_cfg` (benchmark objects only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchConfig {
    pub counter: u64,
    pub base_v4: u32,
    pub pad: u32,
}

// SAFETY: each type is #[repr(C)], made only of integers and integer arrays
// with every padding byte spelled out as a field (tests/abi.rs checks the
// sizes against the C layout), so any bit pattern is a valid value and no
// byte is uninitialised.
macro_rules! pod {
    ($($t:ty),* $(,)?) => { $(unsafe impl aya::Pod for $t {})* };
}
pod!(
    Config,
    Endpoint,
    IpcacheKeyData,
    IpcacheValue,
    PolicyKeyData,
    PolicyValue,
    SubjectKey,
    SubjectValue,
    AuthKey,
    AuthValue,
    CtKey,
    CtEntry,
    FragKey,
    FragValue,
    RawEvent,
    Counter,
    Clock,
    BenchConfig,
);

// === drop and forward reasons ===

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $code:literal => $c:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $variant = $code,)* }

        impl $name {
            /// Every variant with its C enumerator name.
            pub const ALL: &'static [($name, &'static str)] = &[$(($name::$variant, $c),)*];

            pub const fn code(self) -> u8 { self as u8 }

            pub fn from_code(code: u8) -> Option<Self> {
                match code { $($code => Some(Self::$variant),)* _ => None }
            }

            /// The C enumerator name, e.g. for logs and metrics labels.
            pub const fn c_name(self) -> &'static str {
                match self { $(Self::$variant => $c,)* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.c_name()) }
        }
    };
}

code_enum! {
    /// `enum mg_drop_reason` (`bpf/lib/drop_reasons.h`).
    DropReason {
        UnknownL3 = 128 => "DROP_UNKNOWN_L3",
        TruncatedEth = 129 => "DROP_TRUNCATED_ETH",
        TruncatedIpv4 = 130 => "DROP_TRUNCATED_IPV4",
        InvalidIpv4 = 131 => "DROP_INVALID_IPV4",
        TruncatedIpv6 = 132 => "DROP_TRUNCATED_IPV6",
        InvalidIpv6 = 133 => "DROP_INVALID_IPV6",
        TruncatedExthdr = 134 => "DROP_TRUNCATED_EXTHDR",
        TooManyExthdrs = 135 => "DROP_TOO_MANY_EXTHDRS",
        TruncatedL4 = 136 => "DROP_TRUNCATED_L4",
        InvalidL4 = 137 => "DROP_INVALID_L4",
        FragNoFirst = 138 => "DROP_FRAG_NO_FIRST",
        FragInvalid = 139 => "DROP_FRAG_INVALID",
        SpoofedMac = 140 => "DROP_SPOOFED_MAC",
        SpoofedIp = 141 => "DROP_SPOOFED_IP",
        UnknownEndpoint = 142 => "DROP_UNKNOWN_ENDPOINT",
        PolicyDeny = 143 => "DROP_POLICY_DENY",
        PolicyDefault = 144 => "DROP_POLICY_DEFAULT",
        AuthRequired = 145 => "DROP_AUTH_REQUIRED",
        NotReady = 146 => "DROP_NOT_READY",
        TruncatedArp = 147 => "DROP_TRUNCATED_ARP",
        InvalidNd = 148 => "DROP_INVALID_ND",
        SpoofedOrigin = 149 => "DROP_SPOOFED_ORIGIN",
    }
}

/// `MG_DROP_REASON_MAX`: one past the highest drop code.
pub const MG_DROP_REASON_MAX: u8 = 150;

code_enum! {
    /// `enum mg_fwd_reason`: why a packet passed, plus `NOTICE_*` counters.
    ForwardReason {
        CtEstablished = 1 => "FWD_CT_ESTABLISHED",
        CtReply = 2 => "FWD_CT_REPLY",
        PolicyAllow = 3 => "FWD_POLICY_ALLOW",
        AuthAllow = 4 => "FWD_AUTH_ALLOW",
        Unselected = 5 => "FWD_UNSELECTED",
        Arp = 6 => "FWD_ARP",
        Icmpv6Nd = 7 => "FWD_ICMPV6_ND",
        CtReevaluated = 8 => "FWD_CT_REEVALUATED",
        CtRelated = 9 => "FWD_CT_RELATED",
        NoticeCtInsertFailed = 100 => "NOTICE_CT_INSERT_FAILED",
        NoticeEventLost = 101 => "NOTICE_EVENT_LOST",
    }
}

/// A counter slot's code: why packets passed or were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    Forward(ForwardReason),
    Drop(DropReason),
    /// A code this build does not know (a newer datapath).
    Unknown(u8),
}

impl Code {
    pub fn from_code(code: u8) -> Self {
        if let Some(d) = DropReason::from_code(code) {
            Self::Drop(d)
        } else if let Some(f) = ForwardReason::from_code(code) {
            Self::Forward(f)
        } else {
            Self::Unknown(code)
        }
    }

    /// The `verdict` metric label: forward, drop, notice (counted, never a
    /// verdict: `NOTICE_*`), or unknown.
    pub fn verdict(&self) -> &'static str {
        match self {
            Self::Forward(r) if r.c_name().starts_with("NOTICE_") => "notice",
            Self::Forward(_) => "forward",
            Self::Drop(_) => "drop",
            Self::Unknown(_) => "unknown",
        }
    }

    /// The `reason` metric label: the C name in lowercase without its
    /// verdict prefix (`DROP_POLICY_DENY` → `policy_deny`), or `code_<n>`.
    pub fn reason(&self) -> String {
        let name = match self {
            Self::Forward(r) => r.c_name(),
            Self::Drop(r) => r.c_name(),
            Self::Unknown(c) => return format!("code_{c}"),
        };
        let bare = ["FWD_", "DROP_", "NOTICE_"].iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        bare.to_ascii_lowercase()
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Forward(r) => r.fmt(f),
            Self::Drop(r) => r.fmt(f),
            Self::Unknown(c) => write!(f, "code {c}"),
        }
    }
}

// === impl keys ===

impl IpcacheKey {
    pub fn data(&self) -> IpcacheKeyData {
        IpcacheKeyData { family: self.family, pad: self.pad, addr: self.addr }
    }
}

impl PolicyKey {
    pub fn data(&self) -> PolicyKeyData {
        PolicyKeyData { subject: self.subject, peer: self.peer, direction: self.direction, protocol: self.protocol, port: self.port }
    }

    pub fn from_parts(prefixlen: u32, d: PolicyKeyData) -> Self {
        Self { prefixlen, subject: d.subject, peer: d.peer, direction: d.direction, protocol: d.protocol, port: d.port }
    }
}

// The split key types must lay out exactly as the C key after `prefixlen`.
const _: () = {
    assert!(size_of::<IpcacheKey>() == 4 + size_of::<IpcacheKeyData>());
    assert!(size_of::<PolicyKey>() == 4 + size_of::<PolicyKeyData>());
    assert!(std::mem::offset_of!(IpcacheKey, addr) == 4 + std::mem::offset_of!(IpcacheKeyData, addr));
    assert!(std::mem::offset_of!(PolicyKey, port) == 4 + std::mem::offset_of!(PolicyKeyData, port));
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_follow_prometheus_conventions() {
        let c = Code::from_code(DropReason::PolicyDeny.code());
        assert_eq!((c.verdict(), c.reason().as_str()), ("drop", "policy_deny"));
        let c = Code::from_code(ForwardReason::CtEstablished.code());
        assert_eq!((c.verdict(), c.reason().as_str()), ("forward", "ct_established"));
        let c = Code::from_code(ForwardReason::NoticeEventLost.code());
        assert_eq!((c.verdict(), c.reason().as_str()), ("notice", "event_lost"));
        assert_eq!((Code::Unknown(99).verdict(), Code::Unknown(99).reason().as_str()), ("unknown", "code_99"));
        // Every known code gives a distinct lowercase label.
        let mut seen = std::collections::BTreeSet::new();
        for code in 0..=u8::MAX {
            let c = Code::from_code(code);
            if !matches!(c, Code::Unknown(_)) {
                let r = c.reason();
                assert!(r.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'), "{r}");
                assert!(seen.insert((c.verdict(), r)), "duplicate label for code {code}");
            }
        }
    }
}
