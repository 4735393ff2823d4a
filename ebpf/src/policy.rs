//! Policy entries as the node agent's policy compiler states them, and their
//! translation into the kernel's policy trie (`bpf/lib/policy.h`).
//!
//! The agent says, per (subject identity, peer identity, direction): which
//! protocol and ports (a range, an ICMP type, or anything) get which action,
//! and which subjects are default-deny in which direction. This module turns
//! that into trie prefixes: a port range into at most 30 aligned prefixes,
//! and, because a trie lookup returns only the longest matching prefix,
//! stores in every prefix the most restrictive action of all the entries
//! covering it. The datapath then takes the most restrictive answer of its
//! (at most four) identity-wildcard lookups. Net effect, the documented
//! precedence: of all entries matching a packet, DENY beats AUTH-REQUIRED
//! beats ALLOW; no match is a drop for a default-deny subject, else a pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::abi::{self, PolicyKey, PolicyValue, SubjectKey};

/// A numeric identity; [`ANY`] is the wildcard.
pub type Identity = u32;
/// Matches every identity (subject or peer), including the world.
pub const ANY: Identity = abi::MG_IDENTITY_ANY;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy entry {cookie}: ports need a protocol; use protocol Some(n) or Ports::Any")]
    PortsWithoutProtocol { cookie: u32 },
    #[error("policy entry {cookie}: port range {first}-{last} is empty; give first <= last")]
    EmptyRange { cookie: u32, first: u16, last: u16 },
    #[error("policy entry {cookie}: an ICMP type needs protocol 1 (ICMP) or 58 (ICMPv6), not {protocol}")]
    IcmpTypeOnNonIcmp { cookie: u32, protocol: u8 },
    #[error("protocol {protocol} has no ports: give TCP (6), UDP (17), SCTP (132) or an ICMP type")]
    NoPorts { protocol: u8 },
    #[error("ICMP type {port} is above 255, or given as a range")]
    BadIcmpType { port: u16 },
}

/// The pod's point of view: ingress is traffic to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// What an entry does; the most restrictive matching one wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    /// Allow while the auth map holds a live entry for the identity pair and node.
    AuthRequired,
    Deny,
}

/// Which ports (or ICMP messages) an entry covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ports {
    Any,
    /// Inclusive; a single port is `Range { first: p, last: p }`.
    Range {
        first: u16,
        last: u16,
    },
    IcmpType(u8),
    IcmpTypeCode(u8, u8),
}

/// One policy statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    /// The pod the rule is about ([`ANY`]: every pod on the node).
    pub subject: Identity,
    /// The other side ([`ANY`]: everyone, the world included).
    pub peer: Identity,
    pub direction: Direction,
    /// IP protocol number; `None` is every protocol (then `ports` must be `Any`).
    pub protocol: Option<u8>,
    pub ports: Ports,
    pub action: Action,
    /// Reported in drop events: the agent's id for the rule behind this entry.
    pub cookie: u32,
}

/// The whole policy of a node: replaces the previous one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub entries: Vec<PolicyEntry>,
    /// Subjects selected by some policy for a direction: what no entry
    /// allows is dropped. `ANY` makes every pod default-deny.
    pub default_deny: BTreeSet<(Identity, Direction)>,
}

/// The maps' contents for a [`PolicySet`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub trie: BTreeMap<PolicyKey, PolicyValue>,
    pub subjects: BTreeMap<SubjectKey, u32>,
    /// `mg_config.any_subject_flags`, by direction.
    pub any_subject: [u32; abi::MG_DIR_MAX],
}

// === impl Ports ===

impl Ports {
    /// From a `MeshPolicy` port rule (`protocol`, `port`, `endPort`): ports
    /// for TCP, UDP and SCTP, the ICMP type for ICMP and ICMPv6, nothing for
    /// other protocols.
    pub fn from_rule(protocol: u8, port: Option<u16>, end_port: Option<u16>) -> Result<Self, PolicyError> {
        match (protocol, port, end_port) {
            (_, None, None) => Ok(Self::Any),
            (1 | 58, Some(t), None) if t <= 255 => Ok(Self::IcmpType(t as u8)),
            (1 | 58, Some(t), _) => Err(PolicyError::BadIcmpType { port: t }),
            (6 | 17 | 132, Some(first), last) => Ok(Self::Range { first, last: last.unwrap_or(first) }),
            _ => Err(PolicyError::NoPorts { protocol }),
        }
    }
}

// === impl Direction ===

impl Direction {
    pub const fn abi(self) -> u8 {
        match self {
            Self::Ingress => abi::MG_DIR_INGRESS,
            Self::Egress => abi::MG_DIR_EGRESS,
        }
    }

    pub const fn from_abi(d: u8) -> Self {
        if d == abi::MG_DIR_EGRESS { Self::Egress } else { Self::Ingress }
    }
}

// === impl Action ===

impl Action {
    pub const fn abi(self) -> u8 {
        match self {
            Self::Allow => abi::MG_ACTION_ALLOW,
            Self::AuthRequired => abi::MG_ACTION_AUTH,
            Self::Deny => abi::MG_ACTION_DENY,
        }
    }
}

// === impl PolicySet ===

impl PolicySet {
    pub fn compile(&self) -> Result<CompiledPolicy, PolicyError> {
        // (subject, peer, direction) -> (prefixlen, protocol, port) -> (action, cookie)
        type Group = HashMap<(u32, u8, u16), (u8, u32)>;
        let mut groups: BTreeMap<(u32, u32, u8), Group> = BTreeMap::new();
        for e in &self.entries {
            let group = groups.entry((e.subject, e.peer, e.direction.abi())).or_default();
            for prefix in prefixes(e)? {
                let slot = group.entry(prefix).or_insert((0, e.cookie));
                if e.action.abi() > slot.0 {
                    *slot = (e.action.abi(), e.cookie);
                }
            }
        }

        let mut out = CompiledPolicy::default();
        for (&(subject, peer, direction), group) in &groups {
            for (&(len, protocol, port), &(action, cookie)) in group {
                // The most restrictive of this prefix and every shorter one covering it.
                let (mut action, mut cookie) = (action, cookie);
                for ancestor in ancestors(len, protocol, port) {
                    if let Some(&(a, c)) = group.get(&ancestor)
                        && a > action
                    {
                        (action, cookie) = (a, c);
                    }
                }
                let key = PolicyKey { prefixlen: len, subject, peer, direction, protocol, port: port.to_be() };
                out.trie.insert(key, PolicyValue { action, pad: [0; 3], cookie });
            }
            let flag = if peer == ANY { abi::MG_SUBJ_F_ANY_PEER } else { abi::MG_SUBJ_F_EXACT_PEERS };
            out.add_subject_flag(subject, direction, flag);
        }
        for &(subject, direction) in &self.default_deny {
            out.add_subject_flag(subject, direction.abi(), abi::MG_SUBJ_F_DEFAULT_DENY);
        }
        Ok(out)
    }
}

impl CompiledPolicy {
    fn add_subject_flag(&mut self, subject: u32, direction: u8, flag: u32) {
        if subject == ANY {
            self.any_subject[usize::from(direction) & 1] |= flag;
        } else {
            *self.subjects.entry(SubjectKey { identity: subject, direction: u32::from(direction) }).or_default() |= flag;
        }
    }
}

/// The trie prefixes (prefixlen, protocol, port in host order) of one entry.
fn prefixes(e: &PolicyEntry) -> Result<Vec<(u32, u8, u16)>, PolicyError> {
    let cookie = e.cookie;
    let Some(protocol) = e.protocol else {
        return match e.ports {
            Ports::Any => Ok(vec![(abi::MG_POLICY_PREFIX_ANY_PROTO, 0, 0)]),
            _ => Err(PolicyError::PortsWithoutProtocol { cookie }),
        };
    };
    let is_icmp = protocol == 1 || protocol == 58;
    Ok(match e.ports {
        Ports::Any => vec![(abi::MG_POLICY_PREFIX_ANY_PORT, protocol, 0)],
        Ports::Range { first, last } if first > last => return Err(PolicyError::EmptyRange { cookie, first, last }),
        Ports::Range { first, last } => port_range_prefixes(first, last)
            .into_iter()
            .map(|(port, bits)| (abi::MG_POLICY_PREFIX_ANY_PORT + bits, protocol, port))
            .collect(),
        Ports::IcmpType(_) | Ports::IcmpTypeCode(..) if !is_icmp => {
            return Err(PolicyError::IcmpTypeOnNonIcmp { cookie, protocol });
        }
        Ports::IcmpType(t) => vec![(abi::MG_POLICY_PREFIX_ANY_PORT + 8, protocol, u16::from(t) << 8)],
        Ports::IcmpTypeCode(t, c) => {
            vec![(abi::MG_POLICY_PREFIX_FULL, protocol, (u16::from(t) << 8) | u16::from(c))]
        }
    })
}

/// Splits an inclusive port range into aligned blocks: (first port, prefix bits).
pub fn port_range_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    let mut out = Vec::new();
    while lo <= hi {
        // The largest block starting at `lo` that is aligned and fits.
        let mut size = if lo == 0 { 1 << 16 } else { 1u32 << lo.trailing_zeros().min(16) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// Every strictly shorter prefix the datapath could hold that covers this one.
fn ancestors(len: u32, protocol: u8, port: u16) -> impl Iterator<Item = (u32, u8, u16)> {
    let any_proto = (len > abi::MG_POLICY_PREFIX_ANY_PROTO).then_some((abi::MG_POLICY_PREFIX_ANY_PROTO, 0, 0));
    let port_bits = len.saturating_sub(abi::MG_POLICY_PREFIX_ANY_PORT);
    let by_port = (0..port_bits).map(move |bits| {
        let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
        (abi::MG_POLICY_PREFIX_ANY_PORT + bits, protocol, port & mask)
    });
    any_proto.into_iter().chain(by_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(peer: Identity, protocol: Option<u8>, ports: Ports, action: Action, cookie: u32) -> PolicyEntry {
        PolicyEntry { subject: 300, peer, direction: Direction::Ingress, protocol, ports, action, cookie }
    }

    fn covered(blocks: &[(u16, u32)]) -> Vec<u16> {
        let mut ports: Vec<u16> =
            blocks.iter().flat_map(|&(p, bits)| (u32::from(p)..u32::from(p) + (1u32 << (16 - bits))).map(|x| x as u16)).collect();
        ports.sort_unstable();
        ports
    }

    #[test]
    fn port_ranges_become_few_aligned_prefixes() {
        assert_eq!(port_range_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
        for (first, last) in [(9000, 9010), (1, 65534), (1024, 65535), (0, 1023), (5, 5), (65535, 65535)] {
            let blocks = port_range_prefixes(first, last);
            assert!(blocks.len() <= 30, "{first}-{last}: {} prefixes", blocks.len());
            assert_eq!(covered(&blocks), (first..=last).collect::<Vec<_>>(), "{first}-{last}");
        }
    }

    #[test]
    fn deny_is_pushed_into_covered_prefixes() {
        let set = PolicySet {
            entries: vec![
                entry(400, Some(6), Ports::Range { first: 8080, last: 8080 }, Action::Allow, 1),
                entry(400, Some(6), Ports::Range { first: 8000, last: 8191 }, Action::Deny, 2),
                entry(400, None, Ports::Any, Action::AuthRequired, 3),
            ],
            default_deny: [(300, Direction::Ingress)].into(),
        };
        let c = set.compile().unwrap();
        let get =
            |len, port: u16| c.trie[&PolicyKey { prefixlen: len, subject: 300, peer: 400, direction: 0, protocol: 6, port: port.to_be() }];
        // The allow for 8080 sits inside the denied 8000-8191 block.
        assert_eq!(get(96, 8080).action, abi::MG_ACTION_DENY);
        assert_eq!(get(96, 8080).cookie, 2);
        assert_eq!(get(90, 8000).action, abi::MG_ACTION_DENY);
        let any = c.trie[&PolicyKey { prefixlen: 72, subject: 300, peer: 400, direction: 0, protocol: 0, port: 0 }];
        assert_eq!(any.action, abi::MG_ACTION_AUTH);
        assert_eq!(c.subjects[&SubjectKey { identity: 300, direction: 0 }], abi::MG_SUBJ_F_EXACT_PEERS | abi::MG_SUBJ_F_DEFAULT_DENY);
    }

    #[test]
    fn wildcards_set_the_lookup_flags() {
        let mut any_subject = entry(ANY, Some(17), Ports::Any, Action::Allow, 1);
        any_subject.subject = ANY;
        let set = PolicySet {
            entries: vec![entry(ANY, Some(1), Ports::IcmpType(8), Action::Allow, 2), any_subject],
            default_deny: [(ANY, Direction::Egress)].into(),
        };
        let c = set.compile().unwrap();
        assert_eq!(c.subjects[&SubjectKey { identity: 300, direction: 0 }], abi::MG_SUBJ_F_ANY_PEER);
        assert_eq!(c.any_subject, [abi::MG_SUBJ_F_ANY_PEER, abi::MG_SUBJ_F_DEFAULT_DENY]);
        assert!(c.trie.contains_key(&PolicyKey {
            prefixlen: 88,
            subject: 300,
            peer: ANY,
            direction: 0,
            protocol: 1,
            port: (8u16 << 8).to_be()
        }));
    }

    #[test]
    fn ports_from_policy_rules() {
        assert_eq!(Ports::from_rule(6, Some(8080), None), Ok(Ports::Range { first: 8080, last: 8080 }));
        assert_eq!(Ports::from_rule(132, Some(9000), Some(9010)), Ok(Ports::Range { first: 9000, last: 9010 }));
        assert_eq!(Ports::from_rule(1, Some(8), None), Ok(Ports::IcmpType(8)));
        assert_eq!(Ports::from_rule(1, None, None), Ok(Ports::Any));
        assert_eq!(Ports::from_rule(47, None, None), Ok(Ports::Any));
        assert_eq!(Ports::from_rule(47, Some(1), None), Err(PolicyError::NoPorts { protocol: 47 }));
        assert_eq!(Ports::from_rule(58, Some(300), None), Err(PolicyError::BadIcmpType { port: 300 }));
    }

    #[test]
    fn rejects_inconsistent_entries() {
        let e =
            |protocol, ports| PolicySet { entries: vec![entry(400, protocol, ports, Action::Allow, 7)], ..Default::default() }.compile();
        assert_eq!(e(None, Ports::Range { first: 1, last: 2 }).unwrap_err(), PolicyError::PortsWithoutProtocol { cookie: 7 });
        assert_eq!(e(Some(6), Ports::Range { first: 9, last: 2 }).unwrap_err(), PolicyError::EmptyRange { cookie: 7, first: 9, last: 2 });
        assert_eq!(e(Some(6), Ports::IcmpType(8)).unwrap_err(), PolicyError::IcmpTypeOnNonIcmp { cookie: 7, protocol: 6 });
    }
}
