//! An in-memory double of the datapath boundary, for the agents' tests: it
//! records what the agent asked for and answers counters from a table the
//! test fills.

use std::collections::BTreeMap;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::auth::AuthPair;
use crate::datapath::{
    Counters, DatapathApi, DatapathError, GcStats, Interface, IpcacheEntry, PodEndpoint,
};
use crate::policy::{CompiledPolicy, PolicySet};

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub pods: BTreeMap<String, PodEndpoint>,
    pub ipcache: BTreeMap<IpNet, IpcacheEntry>,
    pub policy: PolicySet,
    /// What the real datapath would write for `policy`.
    pub compiled: CompiledPolicy,
    pub revision: u32,
    pub auth: BTreeMap<AuthPair, SystemTime>,
    pub counters: Counters,
    pub gc_runs: usize,
}

fn iface_key(iface: &Interface) -> String {
    match iface {
        Interface::Name(n) => n.clone(),
        Interface::Index(i) => format!("#{i}"),
    }
}

impl DatapathApi for FakeDatapath {
    fn attach(&mut self, iface: &Interface, pod: &PodEndpoint) -> Result<(), DatapathError> {
        if pod.identity < crate::abi::MG_IDENTITY_MIN_WORKLOAD {
            return Err(DatapathError::ReservedIdentity { identity: pod.identity });
        }
        self.pods.insert(iface_key(iface), pod.clone());
        Ok(())
    }

    fn detach(&mut self, iface: &Interface) -> Result<(), DatapathError> {
        self.pods.remove(&iface_key(iface));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Direction, PolicyEntry, Ports};

    #[test]
    fn the_double_records_and_compiles() {
        let mut dp = FakeDatapath::default();
        let pod = PodEndpoint { identity: 300, mac: [2, 0, 0, 0, 0, 1], ipv4: None, ipv6: None };
        dp.attach(&Interface::Name("veth0".into()), &pod).unwrap();
        assert!(matches!(
            dp.attach(&Interface::Index(3), &PodEndpoint { identity: 2, ..pod.clone() }),
            Err(DatapathError::ReservedIdentity { identity: 2 })
        ));
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
        dp.detach(&Interface::Name("veth0".into())).unwrap();
        assert!(dp.pods.is_empty());
    }
}
