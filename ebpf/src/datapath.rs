//! Loading (or adopting) one datapath instance, attaching pods, and keeping
//! its maps: ipcache, policy, auth, conntrack, counters, events.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::ProgramError;
use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use tracing::{debug, info};

use crate::abi::{
    self, Clock, Code, Config, Counter, CtEntry, CtKey, Endpoint, FragKey, FragValue, IpcacheKeyData, IpcacheValue, PolicyKey,
    PolicyKeyData, PolicyValue, SubjectKey, SubjectValue,
};
use crate::auth::{AuthPair, AuthTable};
use crate::events::{EventError, EventReader};
use crate::objects;
use crate::pin::{PinError, PinLayout};
use crate::policy::{CompiledPolicy, Direction, PolicyError, PolicySet};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("cannot load the eBPF object: {0}; loading needs root (CAP_BPF, CAP_NET_ADMIN)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF object has no {what} named {name}: the embedded object and this crate disagree (a bug)")]
    BugMissing { what: &'static str, name: String },
    #[error("program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot pin {path}: {source}")]
    PinObject {
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("link pin {path}: {source}")]
    Link {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("program {name} was attached without a TCX link ({source}): meshguard needs a kernel with TCX (6.6+)")]
    LinkKind {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach to interface {name} ({source}); it was {down}")]
    HeldDown {
        name: String,
        #[source]
        source: Box<DatapathError>,
        down: String,
    },
    #[error("interface index {ifindex} is beyond the endpoint map ({max} entries): raise MapSizes::endpoints")]
    IfindexTooLarge { ifindex: u32, max: u32 },
    #[error("identity {identity} is reserved: workload identities start at {min}", min = abi::MG_IDENTITY_MIN_WORKLOAD)]
    ReservedIdentity { identity: u32 },
    #[error("cannot read the datapath clock (BPF_PROG_TEST_RUN): {source}")]
    Clock {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Events(#[from] EventError),
}

/// Map capacities. Conntrack and fragments are preallocated LRU hashes
/// (memory is spent up front); the tries allocate per entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Highest pod interface index + 1 (an array indexed by ifindex).
    pub endpoints: u32,
    pub ipcache: u32,
    pub policy: u32,
    pub subjects: u32,
    pub auth: u32,
    pub conntrack: u32,
    pub fragments: u32,
}

/// Conntrack timeouts per protocol and TCP state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP before the first reply.
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    /// TCP after FIN or RST.
    pub tcp_closing: Duration,
    pub udp: Duration,
    pub sctp: Duration,
    pub icmp: Duration,
    pub other: Duration,
}

/// How programs are attached to interfaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX on Linux 6.6 and later, TC clsact before.
    #[default]
    Auto,
    /// TCX links (Linux >= 6.6), pinned: they outlive the agent.
    Tcx,
    /// TC clsact filters (direct action, priority 1), for kernels before
    /// 6.6: they outlive the agent by themselves; a pin of the program in
    /// the link's place records each one.
    Tc,
}

/// TC clsact filters' priority (first) and handle (ours).
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: u32 = 0x6d67;

impl AttachMode {
    /// `Auto` decided for the running kernel.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if sys::kernel_version() >= (6, 6) => Self::Tcx,
            Self::Auto => Self::Tc,
            m => m,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tcx => "tcx",
            Self::Tc => "tc",
        }
    }
}

/// Everything an instance is loaded with.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub pin: PinLayout,
    /// This node's id, as the ipcache names nodes.
    pub node_id: u32,
    pub sizes: MapSizes,
    pub timeouts: CtTimeouts,
    /// At most one auth-required signal per (local, remote, node) per interval.
    pub auth_signal_interval: Duration,
    /// How long a first fragment's ports are kept for its later fragments.
    pub fragment_timeout: Duration,
    pub attach: AttachMode,
}

/// A pod as its host-side interface sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEndpoint {
    pub identity: u32,
    pub mac: [u8; 6],
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// A host-side interface, by name (in the caller's network namespace) or index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface {
    Name(String),
    Index(u32),
}

/// An ipcache value: who holds an address, and on which node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub identity: u32,
    pub node_id: u32,
}

/// Counters summed over CPUs, by direction and code.
pub type Counters = BTreeMap<(Direction, Code), Counter>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub conntrack_scanned: usize,
    pub conntrack_removed: usize,
    pub fragments_removed: usize,
}

/// The datapath boundary the node agent drives; [`Datapath`] is the real
/// one, `testing::FakeDatapath` an in-memory double.
pub trait DatapathApi: Send {
    /// Attaches both programs to the pod's host-side interface, then records
    /// the pod; returns the interface's index (detach by index: the name may
    /// be gone by then). Fails closed: on any error after the programs are
    /// on, the interface is left without an endpoint entry, so it drops
    /// every packet (`DROP_UNKNOWN_ENDPOINT`).
    fn attach(&mut self, iface: &Interface, pod: &PodEndpoint) -> Result<u32, DatapathError>;
    /// Holds an interface closed: both programs attached, no endpoint entry
    /// (every packet dropped), the old entry's conntrack flushed. When the
    /// programs cannot be attached the interface is set down instead and
    /// the error says so ([`DatapathError::HeldDown`]).
    fn hold_closed(&mut self, iface: &Interface) -> Result<u32, DatapathError>;
    /// What an interface is enforced as right now (both programs attached
    /// and an endpoint entry), if anything: a restarted agent adopts these.
    fn enforced(&self, iface: &Interface) -> Result<Option<(u32, PodEndpoint)>, DatapathError>;
    /// Detaches, forgets the pod and drops its conntrack entries.
    fn detach(&mut self, iface: &Interface) -> Result<(), DatapathError>;
    /// Adds or changes ipcache entries (one revision bump).
    fn set_ipcache(&mut self, entries: &[(IpNet, IpcacheEntry)]) -> Result<(), DatapathError>;
    fn remove_ipcache(&mut self, prefixes: &[IpNet]) -> Result<(), DatapathError>;
    /// Replaces the node's policy; returns the new revision.
    fn replace_policy(&mut self, set: &PolicySet) -> Result<u32, DatapathError>;
    fn set_auth(&mut self, pair: AuthPair, expires: SystemTime) -> Result<(), DatapathError>;
    fn remove_auth(&mut self, pair: AuthPair) -> Result<(), DatapathError>;
    fn gc(&mut self) -> Result<GcStats, DatapathError>;
    fn counters(&self) -> Result<Counters, DatapathError>;
    /// Guards the WireGuard tunnel device: only a pod's own interface may
    /// send into it with a pod source, and packets out of it are the only
    /// ones from off the node that may reach a pod with a pod source
    /// (`bpf/lib/origin.h`). Returns the tunnel's index.
    fn guard_tunnel(&mut self, iface: &Interface) -> Result<u32, DatapathError>;
    /// The cluster's pod ranges (what a pod source is), replacing the last set.
    fn set_pod_ranges(&mut self, ranges: &[IpNet]) -> Result<(), DatapathError>;
}

/// One loaded (or adopted) datapath instance.
pub struct Datapath {
    pin: PinLayout,
    adopted: bool,
    /// Tcx or Tc (resolved).
    attach: AttachMode,
    fragment_timeout: Duration,
    from_pod: SchedClassifier,
    to_pod: SchedClassifier,
    to_tunnel: SchedClassifier,
    config: Array<MapData, Config>,
    endpoints: Array<MapData, Endpoint>,
    ipcache: LpmTrie<MapData, IpcacheKeyData, IpcacheValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    subjects: HashMap<MapData, SubjectKey, SubjectValue>,
    auth: AuthTable,
    ct: HashMap<MapData, CtKey, CtEntry>,
    frag: HashMap<MapData, FragKey, FragValue>,
    counters: PerCpuArray<MapData, Counter>,
    events: Option<Map>,
    auth_events: Option<Map>,
    clock: Array<MapData, Clock>,
    pod_ranges: LpmTrie<MapData, IpcacheKeyData, u32>,
    /// Holds the clock program (loaded, never pinned or attached).
    obj: Ebpf,
    hz: u32,
    /// What the policy maps hold, to diff the next replacement against.
    applied: CompiledPolicy,
}

// === impl defaults ===

impl Default for MapSizes {
    fn default() -> Self {
        Self { endpoints: 65536, ipcache: 65536, policy: 65536, subjects: 16384, auth: 16384, conntrack: 65536, fragments: 4096 }
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            sctp: Duration::from_secs(300),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(60),
        }
    }
}

impl DatapathConfig {
    pub fn new(pin: PinLayout, node_id: u32) -> Self {
        Self {
            pin,
            node_id,
            sizes: MapSizes::default(),
            timeouts: CtTimeouts::default(),
            auth_signal_interval: Duration::from_secs(1),
            fragment_timeout: Duration::from_secs(30),
            attach: AttachMode::Auto,
        }
    }
}

/// `d` in jiffies at `hz`, rounded up (a timeout never shrinks to nothing).
pub fn to_jiffies(d: Duration, hz: u32) -> u64 {
    (d.as_nanos() * u128::from(hz)).div_ceil(1_000_000_000).min(u128::from(u64::MAX)) as u64
}

impl CtTimeouts {
    fn abi(&self, hz: u32) -> [u64; abi::MG_CT_TIMEOUT_MAX] {
        let ns = |d: Duration| to_jiffies(d, hz);
        let mut t = [0; abi::MG_CT_TIMEOUT_MAX];
        t[abi::MG_CT_TIMEOUT_TCP_SYN] = ns(self.tcp_syn);
        t[abi::MG_CT_TIMEOUT_TCP_EST] = ns(self.tcp_established);
        t[abi::MG_CT_TIMEOUT_TCP_CLOSE] = ns(self.tcp_closing);
        t[abi::MG_CT_TIMEOUT_UDP] = ns(self.udp);
        t[abi::MG_CT_TIMEOUT_SCTP] = ns(self.sctp);
        t[abi::MG_CT_TIMEOUT_ICMP] = ns(self.icmp);
        t[abi::MG_CT_TIMEOUT_OTHER] = ns(self.other);
        t
    }
}

// === impl Datapath ===

pub(crate) fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::BugMissing { what: "map", name: name.to_owned() })
}

impl Datapath {
    /// Loads the datapath under `cfg.pin`, or adopts what is pinned there:
    /// maps (conntrack included) and programs are reused, never flushed, so
    /// enforcement carries on across an agent restart.
    pub fn load_or_adopt(cfg: &DatapathConfig) -> Result<Self, DatapathError> {
        cfg.pin.prepare()?;
        let adopted = cfg.pin.exists();
        let s = cfg.sizes;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(cfg.pin.maps())
            .set_max_entries(abi::MAP_ENDPOINTS, s.endpoints)
            .set_max_entries(abi::MAP_IPCACHE, s.ipcache)
            .set_max_entries(abi::MAP_POLICY, s.policy)
            .set_max_entries(abi::MAP_SUBJECTS, s.subjects)
            .set_max_entries(abi::MAP_AUTH, s.auth)
            .set_max_entries(abi::MAP_AUTH_SIGNAL, s.auth)
            .set_max_entries(abi::MAP_CT, s.conntrack)
            .set_max_entries(abi::MAP_FRAG, s.fragments)
            .load(objects::DATAPATH)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;

        let from_pod = program(&mut ebpf, &cfg.pin, abi::PROG_FROM_POD)?;
        {
            let clock: &mut SchedClassifier = ebpf
                .program_mut(abi::PROG_CLOCK)
                .ok_or(DatapathError::BugMissing { what: "program", name: abi::PROG_CLOCK.to_owned() })?
                .try_into()
                .map_err(|source| DatapathError::Program { name: abi::PROG_CLOCK.to_owned(), source })?;
            clock.load().map_err(|source| DatapathError::Program { name: abi::PROG_CLOCK.to_owned(), source })?;
        }
        let to_pod = program(&mut ebpf, &cfg.pin, abi::PROG_TO_POD)?;
        let to_tunnel = program(&mut ebpf, &cfg.pin, abi::PROG_TO_TUNNEL)?;
        let mut dp = Self {
            pin: cfg.pin.clone(),
            adopted,
            attach: cfg.attach.resolve(),
            fragment_timeout: cfg.fragment_timeout,
            from_pod,
            to_pod,
            to_tunnel,
            config: Array::try_from(take(&mut ebpf, abi::MAP_CONFIG)?).map_err(map_err(abi::MAP_CONFIG))?,
            endpoints: Array::try_from(take(&mut ebpf, abi::MAP_ENDPOINTS)?).map_err(map_err(abi::MAP_ENDPOINTS))?,
            ipcache: LpmTrie::try_from(take(&mut ebpf, abi::MAP_IPCACHE)?).map_err(map_err(abi::MAP_IPCACHE))?,
            policy: LpmTrie::try_from(take(&mut ebpf, abi::MAP_POLICY)?).map_err(map_err(abi::MAP_POLICY))?,
            subjects: HashMap::try_from(take(&mut ebpf, abi::MAP_SUBJECTS)?).map_err(map_err(abi::MAP_SUBJECTS))?,
            auth: AuthTable { map: HashMap::try_from(take(&mut ebpf, abi::MAP_AUTH)?).map_err(map_err(abi::MAP_AUTH))? },
            ct: HashMap::try_from(take(&mut ebpf, abi::MAP_CT)?).map_err(map_err(abi::MAP_CT))?,
            frag: HashMap::try_from(take(&mut ebpf, abi::MAP_FRAG)?).map_err(map_err(abi::MAP_FRAG))?,
            counters: PerCpuArray::try_from(take(&mut ebpf, abi::MAP_COUNTERS)?).map_err(map_err(abi::MAP_COUNTERS))?,
            events: Some(take(&mut ebpf, abi::MAP_EVENTS)?),
            auth_events: Some(take(&mut ebpf, abi::MAP_AUTH_EVENTS)?),
            clock: Array::try_from(take(&mut ebpf, abi::MAP_CLOCK)?).map_err(map_err(abi::MAP_CLOCK))?,
            pod_ranges: LpmTrie::try_from(take(&mut ebpf, abi::MAP_POD_RANGES)?).map_err(map_err(abi::MAP_POD_RANGES))?,
            obj: ebpf,
            hz: 0,
            applied: CompiledPolicy::default(),
        };
        dp.hz = dp.probe_hz()?;

        let mut config = dp.config()?;
        if config.flags & abi::MG_CFG_F_READY == 0 {
            config.policy_revision = 1;
        }
        config.local_node_id = cfg.node_id;
        config.hz = dp.hz;
        config.ct_timeout = cfg.timeouts.abi(dp.hz);
        config.auth_signal_interval_ns = cfg.auth_signal_interval.as_nanos() as u64;
        config.flags |= abi::MG_CFG_F_READY;
        dp.config.set(0, config, 0).map_err(map_err(abi::MAP_CONFIG))?;
        dp.applied = dp.read_policy()?;
        info!(pin = %cfg.pin.root().display(), adopted, revision = config.policy_revision, attach = dp.attach.as_str(), "datapath ready");
        Ok(dp)
    }

    /// The datapath's clock now, in jiffies (conntrack expiry, fragment age).
    pub fn jiffies_now(&self) -> Result<u64, DatapathError> {
        let prog: &SchedClassifier = self
            .obj
            .program(abi::PROG_CLOCK)
            .ok_or(DatapathError::BugMissing { what: "program", name: abi::PROG_CLOCK.to_owned() })?
            .try_into()
            .map_err(|source| DatapathError::Program { name: abi::PROG_CLOCK.to_owned(), source })?;
        let fd = prog.fd().map_err(|source| DatapathError::Program { name: abi::PROG_CLOCK.to_owned(), source })?;
        // The smallest frame the test runner accepts.
        sys::test_run(fd.as_fd(), &[0u8; 14], 1).map_err(|source| DatapathError::Clock { source })?;
        Ok(self.clock.get(&0, 0).map_err(map_err(abi::MAP_CLOCK))?.jiffies)
    }

    /// The kernel's HZ, measured once per process: jiffies elapsed over
    /// 100 ms of CLOCK_MONOTONIC, snapped to the values Linux allows.
    fn probe_hz(&self) -> Result<u32, DatapathError> {
        static HZ: OnceLock<u32> = OnceLock::new();
        if let Some(hz) = HZ.get() {
            return Ok(*hz);
        }
        let (j0, t0) = (self.jiffies_now()?, sys::monotonic_ns());
        std::thread::sleep(Duration::from_millis(100));
        let (j1, t1) = (self.jiffies_now()?, sys::monotonic_ns());
        let measured = (j1 - j0) as f64 * 1e9 / (t1 - t0) as f64;
        let hz = [100u32, 250, 300, 1000]
            .into_iter()
            .min_by(|a, b| (f64::from(*a) - measured).abs().total_cmp(&(f64::from(*b) - measured).abs()))
            .unwrap();
        debug!(measured, hz, "kernel HZ");
        Ok(*HZ.get_or_init(|| hz))
    }

    /// Jiffies per second.
    pub fn hz(&self) -> u32 {
        self.hz
    }

    pub fn pin(&self) -> &PinLayout {
        &self.pin
    }

    /// Names this node's id in the config map (known only once the cluster
    /// source has answered; the datapath loads before that).
    pub fn set_local_node(&mut self, node_id: u32) -> Result<(), DatapathError> {
        let mut c = self.config()?;
        if c.local_node_id != node_id {
            c.local_node_id = node_id;
            self.config.set(0, c, 0).map_err(map_err(abi::MAP_CONFIG))?;
        }
        Ok(())
    }

    /// Names the tunnel device whose packets may reach pods with any pod
    /// source (`guard_tunnel` attaches its program too; tests name one).
    pub fn set_tunnel_ifindex(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let mut c = self.config()?;
        if c.tunnel_ifindex != ifindex {
            c.tunnel_ifindex = ifindex;
            self.config.set(0, c, 0).map_err(map_err(abi::MAP_CONFIG))?;
        }
        Ok(())
    }

    /// Whether this instance was already pinned when loaded.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        self.config.get(&0, 0).map_err(map_err(abi::MAP_CONFIG))
    }

    pub fn revision(&self) -> Result<u32, DatapathError> {
        Ok(self.config()?.policy_revision)
    }

    /// Makes every conntrack entry re-evaluate on its next packet.
    pub fn bump_revision(&mut self) -> Result<u32, DatapathError> {
        let mut c = self.config()?;
        c.policy_revision = c.policy_revision.wrapping_add(1).max(1);
        self.config.set(0, c, 0).map_err(map_err(abi::MAP_CONFIG))?;
        Ok(c.policy_revision)
    }

    /// The file descriptor of `mg_from_pod` (true) or `mg_to_pod` (false),
    /// for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, from_pod: bool) -> Result<BorrowedFd<'_>, DatapathError> {
        let (prog, name) = if from_pod { (&self.from_pod, abi::PROG_FROM_POD) } else { (&self.to_pod, abi::PROG_TO_POD) };
        prog.fd().map(|fd| fd.as_fd()).map_err(|source| DatapathError::Program { name: name.to_owned(), source })
    }

    // === endpoints ===

    /// Records a pod on `ifindex` without attaching (tests attach nothing).
    pub fn set_endpoint(&mut self, ifindex: u32, pod: &PodEndpoint) -> Result<(), DatapathError> {
        if pod.identity < abi::MG_IDENTITY_MIN_WORKLOAD {
            return Err(DatapathError::ReservedIdentity { identity: pod.identity });
        }
        let max = self.endpoints.len();
        if ifindex >= max {
            return Err(DatapathError::IfindexTooLarge { ifindex, max });
        }
        let mut ep = Endpoint { identity: pod.identity, flags: abi::MG_EP_F_VALID, mac: pod.mac, ..Default::default() };
        if let Some(v4) = pod.ipv4 {
            ep.flags |= abi::MG_EP_F_HAS_IPV4;
            ep.ipv4 = v4.octets();
        }
        if let Some(v6) = pod.ipv6 {
            ep.flags |= abi::MG_EP_F_HAS_IPV6;
            ep.ipv6 = v6.octets();
        }
        let before = self.endpoint(ifindex)?;
        self.endpoints.set(ifindex, ep, 0).map_err(map_err(abi::MAP_ENDPOINTS))?;
        // Flows admitted for the interface's previous identity or addresses
        // are judged again.
        if before.is_some_and(|b| b != ep) {
            self.bump_revision()?;
        }
        Ok(())
    }

    pub fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>, DatapathError> {
        let ep = self.endpoints.get(&ifindex, 0).map_err(map_err(abi::MAP_ENDPOINTS))?;
        Ok((ep.flags & abi::MG_EP_F_VALID != 0).then_some(ep))
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        if ifindex < self.endpoints.len() {
            self.endpoints.set(ifindex, Endpoint::default(), 0).map_err(map_err(abi::MAP_ENDPOINTS))?;
        }
        Ok(())
    }

    /// Removes the endpoint entry of `ifindex`, if any, and the conntrack
    /// entries of its addresses: nothing admitted for it survives.
    fn clear_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        if ifindex >= self.endpoints.len() {
            return Ok(());
        }
        if let Some(ep) = self.endpoint(ifindex)? {
            let mut addrs = Vec::new();
            if ep.flags & abi::MG_EP_F_HAS_IPV4 != 0 {
                addrs.push(IpAddr::from(ep.ipv4));
            }
            if ep.flags & abi::MG_EP_F_HAS_IPV6 != 0 {
                addrs.push(IpAddr::from(ep.ipv6));
            }
            self.remove_endpoint(ifindex)?;
            self.flush_conntrack_for(&addrs)?;
        }
        Ok(())
    }

    fn attach_programs(&mut self, ifindex: u32, ifname: &str) -> Result<(), DatapathError> {
        self.attach_one(ifindex, ifname, true)?;
        self.attach_one(ifindex, ifname, false)
    }

    fn resolve(iface: &Interface) -> Result<(u32, String), DatapathError> {
        match iface {
            Interface::Name(name) => {
                sys::ifindex(name).map(|i| (i, name.clone())).map_err(|source| DatapathError::Interface { name: name.clone(), source })
            }
            Interface::Index(i) => {
                sys::ifname(*i).map(|n| (*i, n)).map_err(|source| DatapathError::Interface { name: format!("#{i}"), source })
            }
        }
    }

    /// Attaches one program with TCX, first in the chain, and pins the link.
    /// A link already pinned for the same interface and program is replaced
    /// only after the new one is attached: no gap without enforcement.
    fn attach_one(&mut self, ifindex: u32, ifname: &str, from_pod: bool) -> Result<(), DatapathError> {
        let (prog, name, kind) = if from_pod {
            (&mut self.from_pod, abi::PROG_FROM_POD, TcAttachType::Ingress)
        } else {
            (&mut self.to_pod, abi::PROG_TO_POD, TcAttachType::Egress)
        };
        let (path, tmp) = (self.pin.link(ifindex, name), self.pin.links().join(format!("{ifindex}-{name}-new")));
        attach_pinned(prog, name, ifname, kind, &path, &tmp, self.attach)?;
        debug!(ifindex, ifname, program = name, "attached");
        Ok(())
    }

    /// Where the tunnel's link is pinned (not as `<ifindex>-...`:
    /// [`Datapath::attached`] lists pods only).
    fn tunnel_link(&self, ifindex: u32) -> std::path::PathBuf {
        // Read back by parse_link_pin.
        self.pin.links().join(format!("tunnel-{ifindex}-{}", abi::PROG_TO_TUNNEL))
    }

    /// How programs are attached (resolved: `Tcx` or `Tc`).
    pub fn attach_mode(&self) -> AttachMode {
        self.attach
    }

    /// The pods with pinned links, by interface index.
    pub fn attached(&self) -> Vec<u32> {
        let mut out: Vec<u32> = std::fs::read_dir(self.pin.links())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| match parse_link_pin(&e.file_name().into_string().ok()?)? {
                (false, ifindex, _) => Some(ifindex),
                (true, ..) => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes conntrack entries whose local address is one of `addrs`.
    pub fn flush_conntrack_for(&mut self, addrs: &[IpAddr]) -> Result<usize, DatapathError> {
        let keys: Vec<[u8; 16]> = addrs.iter().map(|a| addr_bytes(*a).1).collect();
        let doomed: Vec<CtKey> = self.ct.keys().filter_map(Result::ok).filter(|k| keys.contains(&k.local_addr)).collect();
        for k in &doomed {
            let _ = self.ct.remove(k);
        }
        Ok(doomed.len())
    }

    // === ipcache ===

    pub fn ipcache_get(&self, prefix: IpNet) -> Result<Option<IpcacheEntry>, DatapathError> {
        match self.ipcache.get(&ipcache_key(prefix), 0) {
            Ok(v) => Ok(Some(IpcacheEntry { identity: v.identity, node_id: v.node_id })),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(abi::MAP_IPCACHE)(e)),
        }
    }

    // === policy ===

    fn read_policy(&self) -> Result<CompiledPolicy, DatapathError> {
        let mut out = CompiledPolicy::default();
        for item in self.policy.iter() {
            let (k, v) = item.map_err(map_err(abi::MAP_POLICY))?;
            out.trie.insert(PolicyKey::from_parts(k.prefix_len(), k.data()), v);
        }
        for item in self.subjects.iter() {
            let (k, v) = item.map_err(map_err(abi::MAP_SUBJECTS))?;
            out.subjects.insert(k, v.flags);
        }
        out.any_subject = self.config()?.any_subject_flags;
        Ok(out)
    }

    /// The policy entries as the maps hold them.
    pub fn applied_policy(&self) -> &CompiledPolicy {
        &self.applied
    }

    fn write_subjects(&mut self, subjects: &BTreeMap<SubjectKey, u32>, any: [u32; 2]) -> Result<(), DatapathError> {
        for (k, &flags) in subjects {
            self.subjects.insert(k, SubjectValue { flags }, 0).map_err(map_err(abi::MAP_SUBJECTS))?;
        }
        let mut c = self.config()?;
        c.any_subject_flags = any;
        self.config.set(0, c, 0).map_err(map_err(abi::MAP_CONFIG))
    }

    // === conntrack ===

    /// Writes a conntrack entry directly (state restore tools, benchmarks).
    pub fn insert_conntrack(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), DatapathError> {
        self.ct.insert(key, entry, 0).map_err(map_err(abi::MAP_CT))
    }

    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>, DatapathError> {
        self.ct.iter().map(|r| r.map_err(map_err(abi::MAP_CT))).collect()
    }

    /// Opens the drop-event ring; the first call takes this handle's copy,
    /// later ones open the pin again.
    pub fn events(&mut self) -> Result<EventReader, DatapathError> {
        match self.events.take() {
            Some(map) => Ok(EventReader::from_map(map)?),
            None => Ok(EventReader::open(&self.pin)?),
        }
    }

    /// Opens the auth-required signal ring (normally auth-handshake's, via
    /// [`EventReader::open_auth_signals`]).
    pub fn auth_signals(&mut self) -> Result<EventReader, DatapathError> {
        match self.auth_events.take() {
            Some(map) => Ok(EventReader::from_map(map)?),
            None => Ok(EventReader::open_auth_signals(&self.pin)?),
        }
    }

    pub fn auth_table(&mut self) -> &mut AuthTable {
        &mut self.auth
    }

    /// Unpins everything of this instance: detaches every pod, frees the maps.
    pub fn remove(self) -> Result<(), DatapathError> {
        let pin = self.pin.clone();
        drop(self);
        remove_instance(&pin)
    }
}

fn program(ebpf: &mut Ebpf, pin: &PinLayout, name: &'static str) -> Result<SchedClassifier, DatapathError> {
    let path = pin.prog(name);
    let perr = |source| DatapathError::Program { name: name.to_owned(), source };
    if !path.exists() {
        let prog: &mut SchedClassifier =
            ebpf.program_mut(name).ok_or(DatapathError::BugMissing { what: "program", name: name.to_owned() })?.try_into().map_err(perr)?;
        prog.load().map_err(perr)?;
        prog.pin(&path).map_err(|source| DatapathError::PinObject { path: path.display().to_string(), source })?;
    }
    SchedClassifier::from_pin(&path).map_err(perr)
}

/// Attaches `prog` to `ifname`, first in the chain, and pins its link at
/// `path` (through `tmp`, so a link already pinned there is replaced only
/// once the new one is on). In `Tc` mode the filter is replaced in place
/// and the program itself is pinned at `path` as its record.
fn attach_pinned(
    prog: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    kind: TcAttachType,
    path: &Path,
    tmp: &Path,
    mode: AttachMode,
) -> Result<(), DatapathError> {
    let perr = |source| DatapathError::Program { name: name.to_owned(), source };
    if mode == AttachMode::Tc {
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(DatapathError::Interface { name: ifname.to_owned(), source: e });
        }
        let opts = aya::programs::tc::NlOptions { priority: TC_PRIORITY, handle: TC_HANDLE };
        let id = match prog.attach_with_options(ifname, kind, TcAttachOptions::Netlink(opts)) {
            Ok(id) => id,
            // Ours is there already (a restart, a re-attach): point it at
            // this program, in place (never a moment without a filter).
            Err(first) => {
                let link = aya::programs::tc::SchedClassifierLink::attached(ifname, kind, TC_PRIORITY, TC_HANDLE)
                    .map_err(|source| DatapathError::Interface { name: ifname.to_owned(), source })?;
                prog.attach_to_link(link).map_err(|_| perr(first))?
            }
        };
        // A netlink filter stays until deleted: dropping the link must not detach it.
        std::mem::forget(prog.take_link(id).map_err(perr)?);
        if !path.exists() {
            prog.pin(path).map_err(|source| DatapathError::PinObject { path: path.display().to_string(), source })?;
        }
        debug!(ifname, program = name, "attached (tc clsact)");
        return Ok(());
    }
    let id = match prog.attach_with_options(ifname, kind, TcAttachOptions::TcxOrder(LinkOrder::first())) {
        Ok(id) => id,
        // This program already sits on this hook, through the link we
        // pinned (a restarted agent re-attaching): nothing to do.
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) && path.exists() => {
            debug!(ifname, program = name, "already attached");
            return Ok(());
        }
        Err(e) => return Err(perr(e)),
    };
    let link = prog.take_link(id).map_err(perr)?;
    let link = FdLink::try_from(link).map_err(|source| DatapathError::LinkKind { name, source })?;
    // bpffs refuses names with a dot.
    let _ = std::fs::remove_file(tmp);
    let pinned = link.pin(tmp).map_err(|source| DatapathError::PinObject { path: tmp.display().to_string(), source })?;
    std::fs::rename(tmp, path).map_err(|source| DatapathError::Link { path: path.display().to_string(), source })?;
    // The pin keeps the link; our descriptor may go.
    drop(pinned);
    Ok(())
}

/// Removes the link pinned at `path` for `program` on `ifindex`. A TCX
/// link goes with its pin; a TC filter (whose pin is only its record) is
/// deleted too, if the interface still exists.
fn unpin_link(path: &Path, ifindex: u32, program: &str) -> Result<(), DatapathError> {
    let kind = if program == abi::PROG_FROM_POD { TcAttachType::Ingress } else { TcAttachType::Egress };
    if let Ok(ifname) = sys::ifname(ifindex)
        && let Ok(link) = aya::programs::tc::SchedClassifierLink::attached(&ifname, kind, TC_PRIORITY, TC_HANDLE)
    {
        use aya::programs::links::Link as _;
        // Fails harmlessly when there is no such filter (TCX mode).
        let _ = link.detach();
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Link { path: path.display().to_string(), source }),
    }
}

/// Removes an instance's pins, detaching every program it attached (TC
/// filters included, which outlive their pins): for `Datapath::remove` and
/// an uninstall that never loaded the datapath.
pub fn remove_instance(pin: &PinLayout) -> Result<(), DatapathError> {
    if let Ok(dir) = std::fs::read_dir(pin.links()) {
        for e in dir.flatten() {
            if let Some((_, ifindex, program)) = e.file_name().to_str().and_then(parse_link_pin) {
                unpin_link(&e.path(), ifindex, program)?;
            }
        }
    }
    Ok(pin.remove()?)
}

/// A link pin's file name: `<ifindex>-<program>` for a pod's interface,
/// `tunnel-<ifindex>-<program>` for the tunnel's, as (tunnel, ifindex,
/// program). None for anything else, such as a `-new` pin being replaced.
fn parse_link_pin(name: &str) -> Option<(bool, u32, &str)> {
    if name.ends_with("-new") {
        return None;
    }
    let (tunnel, rest) = match name.strip_prefix("tunnel-") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let (ifindex, program) = rest.split_once('-')?;
    Some((tunnel, ifindex.parse().ok()?, program))
}

/// (family, 16 address bytes) as the maps store addresses.
pub fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    match addr {
        IpAddr::V4(v4) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&v4.octets());
            (abi::MG_FAMILY_IPV4, b)
        }
        IpAddr::V6(v6) => (abi::MG_FAMILY_IPV6, v6.octets()),
    }
}

fn ipcache_key(prefix: IpNet) -> LpmKey<IpcacheKeyData> {
    let prefix = prefix.trunc();
    let (family, addr) = addr_bytes(prefix.addr());
    LpmKey::new(abi::MG_IPCACHE_PREFIX_BASE + u32::from(prefix.prefix_len()), IpcacheKeyData { family, pad: [0; 3], addr })
}

fn policy_key(k: &PolicyKey) -> LpmKey<PolicyKeyData> {
    LpmKey::new(k.prefixlen, k.data())
}

// === impl DatapathApi for Datapath ===

impl DatapathApi for Datapath {
    fn attach(&mut self, iface: &Interface, pod: &PodEndpoint) -> Result<u32, DatapathError> {
        let (ifindex, ifname) = Self::resolve(iface)?;
        // Programs first: from here on the interface drops whatever the
        // endpoint map does not vouch for.
        self.attach_programs(ifindex, &ifname)?;
        if let Err(e) = self.set_endpoint(ifindex, pod) {
            self.clear_endpoint(ifindex)?;
            return Err(e);
        }
        info!(ifindex, %ifname, identity = pod.identity, "pod attached");
        Ok(ifindex)
    }

    fn hold_closed(&mut self, iface: &Interface) -> Result<u32, DatapathError> {
        let (ifindex, ifname) = Self::resolve(iface)?;
        self.clear_endpoint(ifindex)?;
        if let Err(e) = self.attach_programs(ifindex, &ifname) {
            let down = match sys::set_link_down(&ifname) {
                Ok(()) => "set down instead, so it sends and receives nothing".to_owned(),
                Err(d) => format!("NOT enforced: setting it down failed too ({d})"),
            };
            return Err(DatapathError::HeldDown { name: ifname, source: Box::new(e), down });
        }
        info!(ifindex, %ifname, "interface held closed");
        Ok(ifindex)
    }

    fn enforced(&self, iface: &Interface) -> Result<Option<(u32, PodEndpoint)>, DatapathError> {
        let (ifindex, _) = Self::resolve(iface)?;
        if ![abi::PROG_FROM_POD, abi::PROG_TO_POD].iter().all(|p| self.pin.link(ifindex, p).exists()) {
            return Ok(None);
        }
        if ifindex >= self.endpoints.len() {
            return Ok(None);
        }
        Ok(self.endpoint(ifindex)?.map(|ep| {
            let pod = PodEndpoint {
                identity: ep.identity,
                mac: ep.mac,
                ipv4: (ep.flags & abi::MG_EP_F_HAS_IPV4 != 0).then(|| Ipv4Addr::from(ep.ipv4)),
                ipv6: (ep.flags & abi::MG_EP_F_HAS_IPV6 != 0).then(|| Ipv6Addr::from(ep.ipv6)),
            };
            (ifindex, pod)
        }))
    }

    fn detach(&mut self, iface: &Interface) -> Result<(), DatapathError> {
        let ifindex = match iface {
            Interface::Index(i) => *i,
            Interface::Name(_) => Self::resolve(iface)?.0,
        };
        for name in [abi::PROG_FROM_POD, abi::PROG_TO_POD] {
            unpin_link(&self.pin.link(ifindex, name), ifindex, name)?;
        }
        self.clear_endpoint(ifindex)?;
        info!(ifindex, "pod detached");
        Ok(())
    }

    fn set_ipcache(&mut self, entries: &[(IpNet, IpcacheEntry)]) -> Result<(), DatapathError> {
        for (prefix, e) in entries {
            let v = IpcacheValue { identity: e.identity, node_id: e.node_id };
            self.ipcache.insert(&ipcache_key(*prefix), v, 0).map_err(map_err(abi::MAP_IPCACHE))?;
        }
        // An address may have changed hands: flows re-evaluate.
        self.bump_revision()?;
        Ok(())
    }

    fn remove_ipcache(&mut self, prefixes: &[IpNet]) -> Result<(), DatapathError> {
        for prefix in prefixes {
            match self.ipcache.remove(&ipcache_key(*prefix)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(abi::MAP_IPCACHE)(e)),
            }
        }
        self.bump_revision()?;
        Ok(())
    }

    /// Order, so that packets during the update are never let through by an
    /// entry that is neither old nor new policy for long: subject flags
    /// widen first (old | new: no lookup is skipped, default-deny holds),
    /// then new and changed entries, then stale ones go, then the flags
    /// narrow, and last the revision bump makes every tracked flow
    /// (including any admitted mid-update) re-evaluate.
    fn replace_policy(&mut self, set: &PolicySet) -> Result<u32, DatapathError> {
        let new = set.compile()?;
        let old = std::mem::take(&mut self.applied);
        let mut union = old.subjects.clone();
        for (k, f) in &new.subjects {
            *union.entry(*k).or_default() |= f;
        }
        let any_union = [old.any_subject[0] | new.any_subject[0], old.any_subject[1] | new.any_subject[1]];
        self.write_subjects(&union, any_union)?;
        for (k, v) in &new.trie {
            if old.trie.get(k) != Some(v) {
                self.policy.insert(&policy_key(k), *v, 0).map_err(map_err(abi::MAP_POLICY))?;
            }
        }
        for k in old.trie.keys().filter(|k| !new.trie.contains_key(k)) {
            match self.policy.remove(&policy_key(k)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(abi::MAP_POLICY)(e)),
            }
        }
        for k in union.keys().filter(|k| !new.subjects.contains_key(k)) {
            match self.subjects.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(abi::MAP_SUBJECTS)(e)),
            }
        }
        self.write_subjects(&new.subjects, new.any_subject)?;
        let entries = new.trie.len();
        self.applied = new;
        let revision = self.bump_revision()?;
        info!(revision, entries, "policy replaced");
        Ok(revision)
    }

    fn set_auth(&mut self, pair: AuthPair, expires: SystemTime) -> Result<(), DatapathError> {
        self.auth.set(pair, expires)
    }

    fn remove_auth(&mut self, pair: AuthPair) -> Result<(), DatapathError> {
        self.auth.remove(pair)
    }

    /// Deletes expired conntrack entries and fragment records.
    fn gc(&mut self) -> Result<GcStats, DatapathError> {
        let now = self.jiffies_now()?;
        let mut stats = GcStats::default();
        let mut expired = Vec::new();
        for item in self.ct.iter() {
            let (k, e) = item.map_err(map_err(abi::MAP_CT))?;
            stats.conntrack_scanned += 1;
            if e.expires <= now {
                expired.push(k);
            }
        }
        for k in &expired {
            if self.ct.remove(k).is_ok() {
                stats.conntrack_removed += 1;
            }
        }
        let horizon = now.saturating_sub(to_jiffies(self.fragment_timeout, self.hz));
        let old: Vec<FragKey> = self.frag.iter().filter_map(Result::ok).filter(|(_, v)| v.created < horizon).map(|(k, _)| k).collect();
        for k in &old {
            if self.frag.remove(k).is_ok() {
                stats.fragments_removed += 1;
            }
        }
        debug!(?stats, "garbage collected");
        Ok(stats)
    }

    fn counters(&self) -> Result<Counters, DatapathError> {
        let mut out = Counters::new();
        for slot in 0..abi::MG_COUNTER_SLOTS {
            let per_cpu = self.counters.get(&slot, 0).map_err(map_err(abi::MAP_COUNTERS))?;
            let sum = per_cpu.iter().fold(Counter::default(), |a, c| Counter { packets: a.packets + c.packets, bytes: a.bytes + c.bytes });
            if sum.packets == 0 {
                continue;
            }
            let direction = Direction::from_abi((slot / abi::MG_CODES_PER_DIR) as u8);
            out.insert((direction, Code::from_code((slot % abi::MG_CODES_PER_DIR) as u8)), sum);
        }
        Ok(out)
    }

    fn guard_tunnel(&mut self, iface: &Interface) -> Result<u32, DatapathError> {
        let (ifindex, ifname) = Self::resolve(iface)?;
        let (path, tmp) = (self.tunnel_link(ifindex), self.pin.links().join(format!("tunnel-{ifindex}-{}-new", abi::PROG_TO_TUNNEL)));
        attach_pinned(&mut self.to_tunnel, abi::PROG_TO_TUNNEL, &ifname, TcAttachType::Egress, &path, &tmp, self.attach)?;
        // A tunnel device of an earlier run, gone or replaced.
        if let Ok(dir) = std::fs::read_dir(self.pin.links()) {
            for e in dir.flatten().filter(|e| e.path() != path) {
                if let Some((true, old, program)) = e.file_name().to_str().and_then(parse_link_pin) {
                    unpin_link(&e.path(), old, program)?;
                }
            }
        }
        self.set_tunnel_ifindex(ifindex)?;
        info!(ifindex, %ifname, "tunnel guarded: only pods' own interfaces send into it with a pod source");
        Ok(ifindex)
    }

    fn set_pod_ranges(&mut self, ranges: &[IpNet]) -> Result<(), DatapathError> {
        let want: std::collections::BTreeSet<IpNet> = ranges.iter().map(IpNet::trunc).collect();
        let have: Vec<LpmKey<IpcacheKeyData>> = self.pod_ranges.keys().filter_map(Result::ok).collect();
        for prefix in &want {
            self.pod_ranges.insert(&ipcache_key(*prefix), 1, 0).map_err(map_err(abi::MAP_POD_RANGES))?;
        }
        for k in have {
            if !want.iter().map(|p| ipcache_key(*p)).any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data()) {
                let _ = self.pod_ranges.remove(&k);
            }
        }
        Ok(())
    }
}

/// Whether `path` looks like an instance pin root (for tools).
pub fn is_instance(path: &Path) -> bool {
    PinLayout::new(path).exists()
}

#[cfg(test)]
mod link_pin_tests {
    #[test]
    fn link_pin_names_parse() {
        use super::parse_link_pin as p;
        assert_eq!(p("12-mg_from_pod"), Some((false, 12, "mg_from_pod")));
        assert_eq!(p("tunnel-7-mg_to_tunnel"), Some((true, 7, "mg_to_tunnel")));
        assert_eq!(p("12-mg_from_pod-new"), None);
        assert_eq!(p("tunnel-7-mg_to_tunnel-new"), None);
        assert_eq!(p("tunnel-x-mg_to_tunnel"), None);
        assert_eq!(p("junk"), None);
    }
}
