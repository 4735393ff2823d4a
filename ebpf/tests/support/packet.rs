//! A small builder for the Ethernet frames the verdict tests feed to
//! BPF_PROG_TEST_RUN. Checksums stay zero: the datapath never reads them.

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const GRE: u8 = 47;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;

/// Offsets into a frame built without options/extension headers.
pub const ETH_LEN: usize = 14;

#[derive(Clone, Debug)]
enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Sctp { sport: u16, dport: u16 },
    Icmp { ty: u8, code: u8, id: u16, body: Vec<u8> },
    Raw { proto: u8, bytes: Vec<u8> },
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    l4: L4,
    payload: usize,
    ip_options: Vec<u8>,
    /// (id, offset in 8-byte units, more fragments)
    frag: Option<(u32, u16, bool)>,
    /// IPv6 extension headers before the fragment header: (type, 8-byte body).
    ext: Vec<u8>,
    /// IPv4 TTL or IPv6 hop limit.
    hops: u8,
}

impl Packet {
    pub fn new(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src: src.into(),
            dst: dst.into(),
            l4: L4::Raw { proto: 253, bytes: vec![] },
            payload: 0,
            ip_options: vec![],
            frag: None,
            ext: vec![],
            hops: 64,
        }
    }

    pub fn tcp(mut self, sport: u16, dport: u16, flags: u8) -> Self {
        self.l4 = L4::Tcp { sport, dport, flags };
        self
    }

    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Udp { sport, dport };
        self
    }

    pub fn sctp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Sctp { sport, dport };
        self
    }

    /// ICMP or ICMPv6, by the address family.
    pub fn icmp(mut self, ty: u8, code: u8, id: u16) -> Self {
        self.l4 = L4::Icmp { ty, code, id, body: vec![] };
        self
    }

    /// An ICMP error quoting `inner` (its IP header and first 8 L4 bytes).
    pub fn icmp_error(mut self, ty: u8, code: u8, inner: &Packet) -> Self {
        let quoted = inner.build();
        let ip = &quoted[ETH_LEN..];
        let ihl = if inner.src.is_ipv4() { usize::from(ip[0] & 0x0f) * 4 } else { 40 };
        let body = ip[..(ihl + 8).min(ip.len())].to_vec();
        self.l4 = L4::Icmp { ty, code, id: 0, body };
        self
    }

    pub fn proto(mut self, proto: u8, bytes: &[u8]) -> Self {
        self.l4 = L4::Raw { proto, bytes: bytes.to_vec() };
        self
    }

    /// The IPv4 TTL or IPv6 hop limit (64 unless set).
    pub fn hop_limit(mut self, hops: u8) -> Self {
        self.hops = hops;
        self
    }

    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    pub fn src_mac(mut self, mac: [u8; 6]) -> Self {
        self.src_mac = mac;
        self
    }

    pub fn ip_options(mut self, options: &[u8]) -> Self {
        assert_eq!(options.len() % 4, 0);
        self.ip_options = options.to_vec();
        self
    }

    /// Fragment fields: IPv4 header fields, or an IPv6 fragment header.
    pub fn fragment(mut self, id: u32, offset_units: u16, more: bool) -> Self {
        self.frag = Some((id, offset_units, more));
        self
    }

    /// An 8-byte IPv6 extension header of `kind` (0 hop-by-hop, 43 routing, 60 destination options).
    pub fn ext6(mut self, kind: u8) -> Self {
        self.ext.push(kind);
        self
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let pad = vec![0xab; self.payload];
        let (proto, mut b) = match &self.l4 {
            L4::Tcp { sport, dport, flags } => {
                let mut b = vec![0u8; 20];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[12] = 5 << 4;
                b[13] = *flags;
                (TCP, b)
            }
            L4::Udp { sport, dport } => {
                let mut b = vec![0u8; 8];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..6].copy_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                (UDP, b)
            }
            L4::Sctp { sport, dport } => {
                let mut b = vec![0u8; 12];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                (SCTP, b)
            }
            L4::Icmp { ty, code, id, body } => {
                let mut b = vec![*ty, *code, 0, 0];
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&[0, 1]);
                b.extend_from_slice(body);
                (if self.src.is_ipv4() { ICMP } else { ICMPV6 }, b)
            }
            L4::Raw { proto, bytes } => (*proto, bytes.clone()),
        };
        b.extend_from_slice(&pad);
        (proto, b)
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, l4) = self.l4_bytes();
        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&[0x08, 0x00]);
                let ihl = 20 + self.ip_options.len();
                let mut ip = vec![0u8; 20];
                ip[0] = 0x40 | (ihl / 4) as u8;
                ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
                if let Some((id, off, more)) = self.frag {
                    ip[4..6].copy_from_slice(&(id as u16).to_be_bytes());
                    let f = off | if more { 0x2000 } else { 0 };
                    ip[6..8].copy_from_slice(&f.to_be_bytes());
                }
                ip[8] = self.hops;
                ip[9] = proto;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                out.extend_from_slice(&ip);
                out.extend_from_slice(&self.ip_options);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend_from_slice(&[0x86, 0xdd]);
                // Chain: ext headers..., [fragment], L4.
                let mut kinds = self.ext.clone();
                if self.frag.is_some() {
                    kinds.push(44);
                }
                let mut chain = Vec::new();
                for (i, kind) in kinds.iter().enumerate() {
                    let next = kinds.get(i + 1).copied().unwrap_or(proto);
                    let mut h = vec![0u8; 8];
                    h[0] = next;
                    if *kind == 44 {
                        let (id, off, more) = self.frag.unwrap();
                        let f = (off << 3) | u16::from(more);
                        h[2..4].copy_from_slice(&f.to_be_bytes());
                        h[4..8].copy_from_slice(&id.to_be_bytes());
                    } else {
                        h[1] = 0; // 8 bytes
                        h[2] = 1; // PadN
                        h[3] = 4;
                    }
                    chain.extend_from_slice(&h);
                }
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
                ip[6] = kinds.first().copied().unwrap_or(proto);
                ip[7] = self.hops;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                out.extend_from_slice(&ip);
                out.extend_from_slice(&chain);
            }
            _ => panic!("source and destination must be the same family"),
        }
        out.extend_from_slice(&l4);
        out
    }
}
