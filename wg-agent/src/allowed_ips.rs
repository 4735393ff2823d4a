//! Cryptokey routing: the longest-prefix-match table from allowed IPs to peers.
//!
//! The same table answers both questions WireGuard asks: "which peer does
//! this outgoing packet go to?" (destination lookup) and "may this peer send
//! a packet with that source?" (source lookup must return the same peer).

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

pub struct AllowedIps<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self { v4: PrefixMap::new(), v6: PrefixMap::new() }
    }
}

impl<T> AllowedIps<T> {
    /// Inserts `net` (its host bits cleared) and returns what it replaced.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(n, value),
            IpNet::V6(n) => self.v6.insert(n, value),
        }
    }

    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(&n),
            IpNet::V6(n) => self.v6.remove(&n),
        }
    }

    pub fn get_exact(&self, net: &IpNet) -> Option<&T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.get(&n),
            IpNet::V6(n) => self.v6.get(&n),
        }
    }

    /// The value of the longest prefix that contains `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.get_lpm(&Ipv4Net::from(a)).map(|(_, v)| v),
            IpAddr::V6(a) => self.v6.get_lpm(&Ipv6Net::from(a)).map(|(_, v)| v),
        }
    }

    pub fn clear(&mut self) {
        self.v4 = PrefixMap::new();
        self.v6 = PrefixMap::new();
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_host_bits_are_cleared() {
        let mut t = AllowedIps::default();
        t.insert("10.0.0.0/8".parse().unwrap(), 'a');
        t.insert("10.1.2.3/16".parse().unwrap(), 'b');
        t.insert("0.0.0.0/0".parse().unwrap(), 'z');
        t.insert("fd00::/64".parse().unwrap(), 'v');
        assert_eq!(t.lookup("10.1.9.9".parse().unwrap()), Some(&'b'));
        assert_eq!(t.lookup("10.2.0.1".parse().unwrap()), Some(&'a'));
        assert_eq!(t.lookup("192.168.0.1".parse().unwrap()), Some(&'z'));
        assert_eq!(t.lookup("fd00::9".parse().unwrap()), Some(&'v'));
        assert_eq!(t.lookup("fd01::9".parse().unwrap()), None);
        assert_eq!(t.get_exact(&"10.1.0.0/16".parse().unwrap()), Some(&'b'));
        assert_eq!(t.remove(&"10.1.0.0/16".parse().unwrap()), Some('b'));
        assert_eq!(t.lookup("10.1.9.9".parse().unwrap()), Some(&'a'));
        assert_eq!(t.len(), 3);
    }
}
