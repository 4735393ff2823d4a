//! Just enough IP header reading for routing decisions: the version and the
//! source and destination addresses. Everything else is the kernel's business.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const IPV4_HEADER_MIN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;

/// The destination address of an IP packet, or `None` for anything that is not
/// a plausible IPv4/IPv6 header.
#[inline]
pub fn dst_addr(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= IPV4_HEADER_MIN => Some(IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))),
        6 if pkt.len() >= IPV6_HEADER_LEN => {
            let b: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The source address of an IP packet.
#[inline]
pub fn src_addr(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= IPV4_HEADER_MIN => Some(IpAddr::V4(Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]))),
        6 if pkt.len() >= IPV6_HEADER_LEN => {
            let b: [u8; 16] = pkt[8..24].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Turns `::ffff:a.b.c.d` (what a dual-stack socket reports for IPv4 peers)
/// back into `a.b.c.d`, so endpoints read the way users wrote them.
#[inline]
pub fn unmap(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(src_addr(&v4), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(dst_addr(&v4), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(dst_addr(&v4[..19]), None);
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[39] = 1;
        assert_eq!(dst_addr(&v6), Some("::1".parse().unwrap()));
        assert_eq!(dst_addr(&[]), None);
        assert_eq!(dst_addr(&[0x50; 40]), None);
        assert_eq!(unmap("[::ffff:1.2.3.4]:5".parse().unwrap()), "1.2.3.4:5".parse().unwrap());
    }
}
