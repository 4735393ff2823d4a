//! An in-memory double of the datapath boundary, for the agents' tests: it
//! keeps what the real datapath would keep (interfaces with programs
//! attached, endpoint entries by ifindex, ipcache, policy) and fails where
//! the real one fails (unknown interface, reserved identity, ifindex past the
//! endpoint map), so a test can ask the one question that matters: does an
//! interface pass traffic it should not?

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use ipnet::IpNet;

use crate::auth::AuthPair;
use crate::datapath::{Counters, DatapathApi, DatapathError, GcStats, Interface, IpcacheEntry, PodEndpoint};
use crate::policy::{CompiledPolicy, PolicySet};

/// What a packet from or to an interface meets, as the kernel would decide it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// No program on the interface: everything passes, unchecked.
    Open,
    /// Programs attached, no endpoint entry: everything is dropped
    /// (`DROP_UNKNOWN_ENDPOINT`).
    Closed,
    /// Programs attached and an endpoint entry: anti-spoofing and policy for
    /// this pod.
    Enforced(PodEndpoint),
    /// No program, but the interface is down: nothing passes.
    Down,
}

#[derive(Debug)]
pub struct FakeDatapath {
    /// Interfaces that exist, by name (the test creates them).
    pub interfaces: BTreeMap<String, u32>,
    /// Interfaces with both programs attached, by index.
    pub links: BTreeSet<u32>,
    /// Endpoint entries, by ifindex.
    pub endpoints: BTreeMap<u32, PodEndpoint>,
    /// The endpoint map's size: an ifindex at or past it has no entry.
    pub endpoint_slots: u32,
    /// Interfaces whose program attachment fails (a test's injected fault).
    pub failing_links: BTreeSet<String>,
    /// Interfaces set down, by name.
    pub down: BTreeSet<String>,
    pub ipcache: BTreeMap<IpNet, IpcacheEntry>,
    pub policy: PolicySet,
    /// What the real datapath would write for `policy`.
    pub compiled: CompiledPolicy,
    pub revision: u32,
    pub auth: BTreeMap<AuthPair, SystemTime>,
    pub counters: Counters,
    pub gc_runs: usize,
    /// The guarded tunnel's index.
    pub tunnel: Option<u32>,
    pub pod_ranges: Vec<IpNet>,
}

impl Default for FakeDatapath {
    fn default() -> Self {
        Self {
            interfaces: BTreeMap::new(),
            links: BTreeSet::new(),
            endpoints: BTreeMap::new(),
            endpoint_slots: 65536,
            failing_links: BTreeSet::new(),
            down: BTreeSet::new(),
            ipcache: BTreeMap::new(),
            policy: PolicySet::default(),
            compiled: CompiledPolicy::default(),
            revision: 0,
            auth: BTreeMap::new(),
            counters: Counters::new(),
            gc_runs: 0,
            tunnel: None,
            pod_ranges: Vec::new(),
        }
    }
}

// === impl FakeDatapath ===

impl FakeDatapath {
    /// Creates an interface (a pod's host-side veth appearing).
    pub fn add_interface(&mut self, name: &str, ifindex: u32) {
        self.interfaces.insert(name.to_owned(), ifindex);
    }

    /// Removes an interface: its programs and links go with it, as in the
    /// kernel; the endpoint entry stays until someone removes it.
    pub fn remove_interface(&mut self, name: &str) {
        if let Some(i) = self.interfaces.remove(name) {
            self.links.remove(&i);
        }
    }

    /// What traffic on the interface named `name` meets.
    pub fn enforcement(&self, name: &str) -> Enforcement {
        let Some(i) = self.interfaces.get(name) else { return Enforcement::Closed };
        if !self.links.contains(i) {
            return if self.down.contains(name) { Enforcement::Down } else { Enforcement::Open };
        }
        match self.endpoints.get(i) {
            Some(ep) => Enforcement::Enforced(ep.clone()),
            None => Enforcement::Closed,
        }
    }

    fn resolve(&self, iface: &Interface) -> Result<(u32, String), DatapathError> {
        let missing = |name: String| DatapathError::Interface { name, source: std::io::Error::from_raw_os_error(libc::ENODEV) };
        match iface {
            Interface::Name(n) => self.interfaces.get(n).map(|i| (*i, n.clone())).ok_or_else(|| missing(n.clone())),
            Interface::Index(i) => {
                self.interfaces.iter().find(|(_, x)| *x == i).map(|(n, _)| (*i, n.clone())).ok_or_else(|| missing(format!("#{i}")))
            }
        }
    }
}

impl DatapathApi for FakeDatapath {
    /// As the real one: programs first, then the endpoint entry, and any
    /// failure after the programs leaves the interface closed.
    fn attach(&mut self, iface: &Interface, pod: &PodEndpoint) -> Result<u32, DatapathError> {
        let (ifindex, name) = self.resolve(iface)?;
        if self.failing_links.contains(&name) {
            return Err(DatapathError::Interface { name, source: std::io::Error::from_raw_os_error(libc::EPERM) });
        }
        self.links.insert(ifindex);
        self.endpoints.remove(&ifindex);
        if pod.identity < crate::abi::MG_IDENTITY_MIN_WORKLOAD {
            return Err(DatapathError::ReservedIdentity { identity: pod.identity });
        }
        if ifindex >= self.endpoint_slots {
            return Err(DatapathError::IfindexTooLarge { ifindex, max: self.endpoint_slots });
        }
        self.endpoints.insert(ifindex, pod.clone());
        Ok(ifindex)
    }

    fn hold_closed(&mut self, iface: &Interface) -> Result<u32, DatapathError> {
        let (ifindex, name) = self.resolve(iface)?;
        self.endpoints.remove(&ifindex);
        if self.failing_links.contains(&name) {
            self.down.insert(name.clone());
            let source = DatapathError::Interface { name: name.clone(), source: std::io::Error::from_raw_os_error(libc::EPERM) };
            return Err(DatapathError::HeldDown { name, source: Box::new(source), down: "set down instead".into() });
        }
        self.links.insert(ifindex);
        Ok(ifindex)
    }

    fn enforced(&self, iface: &Interface) -> Result<Option<(u32, PodEndpoint)>, DatapathError> {
        let (ifindex, _) = self.resolve(iface)?;
        Ok(self.links.contains(&ifindex).then(|| self.endpoints.get(&ifindex).map(|p| (ifindex, p.clone()))).flatten())
    }

    fn detach(&mut self, iface: &Interface) -> Result<(), DatapathError> {
        let ifindex = match iface {
            Interface::Index(i) => *i,
            Interface::Name(_) => self.resolve(iface)?.0,
        };
        self.links.remove(&ifindex);
        self.endpoints.remove(&ifindex);
        Ok(())
    }

    fn set_ipcache(&mut self, entries: &[(IpNet, IpcacheEntry)]) -> Result<(), DatapathError> {
        self.ipcache.extend(entries.iter().map(|(p, e)| (p.trunc(), *e)));
        self.revision += 1;
        Ok(())
    }

    fn remove_ipcache(&mut self, prefixes: &[IpNet]) -> Result<(), DatapathError> {
        for p in prefixes {
            self.ipcache.remove(&p.trunc());
        }
        self.revision += 1;
        Ok(())
    }

    fn replace_policy(&mut self, set: &PolicySet) -> Result<u32, DatapathError> {
        self.compiled = set.compile()?;
        self.policy = set.clone();
        self.revision += 1;
        Ok(self.revision)
    }

    fn set_auth(&mut self, pair: AuthPair, expires: SystemTime) -> Result<(), DatapathError> {
        self.auth.insert(pair, expires);
        Ok(())
    }

    fn remove_auth(&mut self, pair: AuthPair) -> Result<(), DatapathError> {
        self.auth.remove(&pair);
        Ok(())
    }

    fn gc(&mut self) -> Result<GcStats, DatapathError> {
        self.gc_runs += 1;
        Ok(GcStats::default())
    }

    fn counters(&self) -> Result<Counters, DatapathError> {
        Ok(self.counters.clone())
    }

    fn guard_tunnel(&mut self, iface: &Interface) -> Result<u32, DatapathError> {
        let (ifindex, name) = self.resolve(iface)?;
        if self.failing_links.contains(&name) {
            return Err(DatapathError::Interface { name, source: std::io::Error::from_raw_os_error(libc::EPERM) });
        }
        self.tunnel = Some(ifindex);
        Ok(ifindex)
    }

    fn set_pod_ranges(&mut self, ranges: &[IpNet]) -> Result<(), DatapathError> {
        self.pod_ranges = ranges.iter().map(IpNet::trunc).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Direction, PolicyEntry, Ports};

    fn pod(identity: u32) -> PodEndpoint {
        PodEndpoint { identity, mac: [2, 0, 0, 0, 0, 1], ipv4: None, ipv6: None }
    }

    #[test]
    fn the_double_records_and_compiles() {
        let mut dp = FakeDatapath::default();
        dp.add_interface("veth0", 7);
        assert_eq!(dp.enforcement("veth0"), Enforcement::Open);
        assert_eq!(dp.attach(&Interface::Name("veth0".into()), &pod(300)).unwrap(), 7);
        assert_eq!(dp.enforcement("veth0"), Enforcement::Enforced(pod(300)));
        let entry = PolicyEntry {
            subject: 300,
            peer: 400,
            direction: Direction::Ingress,
            protocol: Some(6),
            ports: Ports::Range { first: 80, last: 81 },
            action: Action::Allow,
            cookie: 1,
        };
        let rev = dp.replace_policy(&PolicySet { entries: vec![entry], ..Default::default() }).unwrap();
        assert_eq!(rev, 1);
        assert_eq!(dp.compiled.trie.len(), 1, "80-81 is one aligned prefix");
        dp.detach(&Interface::Index(7)).unwrap();
        assert_eq!(dp.enforcement("veth0"), Enforcement::Open);
    }

    #[test]
    fn failures_after_the_programs_are_on_leave_the_interface_closed() {
        let mut dp = FakeDatapath { endpoint_slots: 100, ..Default::default() };
        dp.add_interface("veth0", 3);
        dp.add_interface("veth1", 100);
        dp.add_interface("veth2", 4);
        dp.failing_links.insert("veth2".into());
        assert!(matches!(dp.attach(&Interface::Name("veth0".into()), &pod(2)), Err(DatapathError::ReservedIdentity { identity: 2 })));
        assert_eq!(dp.enforcement("veth0"), Enforcement::Closed);
        assert!(matches!(
            dp.attach(&Interface::Name("veth1".into()), &pod(300)),
            Err(DatapathError::IfindexTooLarge { ifindex: 100, max: 100 })
        ));
        assert_eq!(dp.enforcement("veth1"), Enforcement::Closed);
        assert!(dp.attach(&Interface::Name("veth2".into()), &pod(300)).is_err());
        assert_eq!(dp.enforcement("veth2"), Enforcement::Open, "no programs: attach alone cannot close it");
        assert!(matches!(dp.hold_closed(&Interface::Name("veth2".into())), Err(DatapathError::HeldDown { .. })));
        assert_eq!(dp.enforcement("veth2"), Enforcement::Down);
    }
}
