//! `mg-probe`: the traffic tool the tests run inside pod and node namespaces.
//! Echo servers and clients for TCP and UDP, SCTP over raw IP sockets (the
//! test kernel has no SCTP stack), long-running TCP streams that measure
//! stalls and verify every byte, a bare HTTP GET, and a sprayer of arbitrary
//! datagrams. Exit status 0 means "it worked as asked".

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mg-probe", about = "meshguard test traffic tool")]
struct Cli {
    /// On success, print `ttfb_ms=<ms>` on stderr: the time from the first
    /// packet sent to the first byte of the answer (for `tcp`, also
    /// `connect_ms=<ms>`: the time connect() took).
    #[arg(long, global = true)]
    timing: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo on TCP and UDP on one port until killed.
    Serve {
        #[arg(long)]
        port: u16,
    },
    /// Send MESSAGE over TCP; succeed if it is echoed back unchanged.
    Tcp {
        addr: SocketAddr,
        message: String,
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Send MESSAGE over UDP (retrying); succeed if it is echoed back.
    Udp {
        addr: SocketAddr,
        message: String,
        #[arg(long, default_value_t = 5)]
        tries: u32,
    },
    /// GET a path over plain HTTP/1.0 and print the body.
    HttpGet { addr: SocketAddr, path: String },
    /// Answer SCTP packets (raw IP protocol 132) to PORT with the ports swapped.
    SctpServe {
        #[arg(long)]
        port: u16,
    },
    /// Send an SCTP DATA chunk carrying MESSAGE to ADDR (raw IP); succeed if
    /// the server's answer carrying it arrives.
    Sctp {
        addr: SocketAddr,
        message: String,
        #[arg(long, default_value_t = 3)]
        tries: u32,
    },
    /// Receive TCP streams on PORT, verify the byte pattern, and answer each
    /// with a JSON report (bytes, pattern ok, longest gap between reads).
    StreamServe {
        #[arg(long)]
        port: u16,
    },
    /// Stream the byte pattern to ADDR for SECONDS at about RATE bytes/s; print
    /// the server's report; succeed if every byte arrived intact.
    Stream {
        addr: SocketAddr,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 2_000_000)]
        rate: u64,
    },
    /// Send COUNT datagrams of LEN pseudo-random bytes (garbage) to ADDR.
    Spray {
        addr: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: u32,
        #[arg(long, default_value_t = 148)]
        len: usize,
        /// Hex bytes to send instead of garbage (e.g. a captured datagram).
        #[arg(long)]
        hex: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let started = std::time::Instant::now();
    let result = match cli.cmd {
        Cmd::Serve { port } => serve(port),
        Cmd::Tcp { addr, message, timeout } => tcp(addr, &message, Duration::from_secs(timeout), cli.timing),
        Cmd::Udp { addr, message, tries } => udp(addr, &message, tries),
        Cmd::HttpGet { addr, path } => http_get(addr, &path),
        Cmd::Spray { addr, count, len, hex } => spray(addr, count, len, hex.as_deref()),
        Cmd::SctpServe { port } => sctp::serve(port),
        Cmd::Sctp { addr, message, tries } => sctp::send(addr, &message, tries),
        Cmd::StreamServe { port } => stream::serve(port),
        Cmd::Stream { addr, seconds, rate } => stream::send(addr, Duration::from_secs(seconds), rate),
    };
    match result {
        Ok(()) => {
            if cli.timing {
                eprintln!("ttfb_ms={:.3}", started.elapsed().as_secs_f64() * 1000.0);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mg-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds on every address, IPv6 and IPv4 where the namespace has IPv6
/// (a dual-stack socket), IPv4 alone where it does not.
fn bind_any<T>(port: u16, bind: impl Fn(SocketAddr) -> std::io::Result<T>) -> std::io::Result<T> {
    bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))).or_else(|_| bind(SocketAddr::from(([0, 0, 0, 0], port))))
}

fn serve(port: u16) -> std::io::Result<()> {
    let udp = bind_any(port, UdpSocket::bind)?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    let tcp = bind_any(port, TcpListener::bind)?;
    for conn in tcp.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

fn tcp(addr: SocketAddr, message: &str, timeout: Duration, timing: bool) -> std::io::Result<()> {
    let t = std::time::Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    if timing {
        eprintln!("connect_ms={:.3}", t.elapsed().as_secs_f64() * 1000.0);
    }
    s.set_read_timeout(Some(timeout))?;
    s.write_all(message.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    if back != message.as_bytes() {
        return Err(std::io::Error::other(format!("echo mismatch: got {} bytes", back.len())));
    }
    println!("{}", String::from_utf8_lossy(&back));
    Ok(())
}

fn udp(addr: SocketAddr, message: &str, tries: u32) -> std::io::Result<()> {
    let s = UdpSocket::bind(("0.0.0.0", 0))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = vec![0u8; 65536];
    for _ in 0..tries.max(1) {
        s.send_to(message.as_bytes(), addr)?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) if from == addr && &buf[..n] == message.as_bytes() => {
                println!("{message}");
                return Ok(());
            }
            _ => continue,
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|c| c != "200") {
        return Err(std::io::Error::other(format!("bad response: {}", head.lines().next().unwrap_or(""))));
    }
    print!("{body}");
    Ok(())
}

fn spray(addr: SocketAddr, count: u32, len: usize, hex: Option<&str>) -> std::io::Result<()> {
    let s = UdpSocket::bind(("0.0.0.0", 0))?;
    let fixed = match hex {
        Some(h) => Some(decode_hex(h).ok_or_else(|| std::io::Error::other("invalid --hex"))?),
        None => None,
    };
    let mut x: u32 = 0x9e37_79b9;
    for i in 0..count {
        let bytes = match &fixed {
            Some(b) => b.clone(),
            None => (0..len)
                .map(|_| {
                    // xorshift: cheap garbage, different each datagram
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x ^ i) as u8
                })
                .collect(),
        };
        s.send_to(&bytes, addr)?;
    }
    Ok(())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// SCTP with raw IP sockets: just enough of RFC 9260 (common header, one
/// DATA chunk, CRC32c) for a policy datapath to see real SCTP packets.
mod sctp {
    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    const IPPROTO_SCTP: i32 = 132;
    const CHUNK_DATA: u8 = 0;

    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// Common header + one DATA chunk (TSN 1, stream 0) carrying `payload`.
    pub fn packet(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let chunk_len = 16 + payload.len();
        let mut p = Vec::with_capacity(12 + chunk_len.next_multiple_of(4));
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&0x4d47_5354u32.to_be_bytes()); // verification tag
        p.extend_from_slice(&[0; 4]); // checksum, filled below
        p.extend_from_slice(&[CHUNK_DATA, 0x03]); // B and E flags: a whole message
        p.extend_from_slice(&(chunk_len as u16).to_be_bytes());
        p.extend_from_slice(&1u32.to_be_bytes()); // TSN
        p.extend_from_slice(&[0, 0, 0, 0]); // stream id, sequence
        p.extend_from_slice(&0u32.to_be_bytes()); // payload protocol
        p.extend_from_slice(payload);
        p.resize(12 + chunk_len.next_multiple_of(4), 0);
        let c = crc32c(&p);
        p[8..12].copy_from_slice(&c.to_le_bytes());
        p
    }

    /// (sport, dport, payload) of a received IPv4 datagram carrying SCTP.
    fn parse(datagram: &[u8]) -> Option<(IpAddr, u16, u16, Vec<u8>)> {
        let ihl = usize::from(datagram.first()? & 0x0f) * 4;
        let src = IpAddr::from(<[u8; 4]>::try_from(datagram.get(12..16)?).ok()?);
        let sctp = datagram.get(ihl..)?;
        let sport = u16::from_be_bytes([*sctp.first()?, *sctp.get(1)?]);
        let dport = u16::from_be_bytes([*sctp.get(2)?, *sctp.get(3)?]);
        let chunk = sctp.get(12..)?;
        if *chunk.first()? != CHUNK_DATA {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([*chunk.get(2)?, *chunk.get(3)?]));
        Some((src, sport, dport, chunk.get(16..len)?.to_vec()))
    }

    fn socket() -> std::io::Result<Socket> {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_SCTP)))
    }

    pub fn serve(port: u16) -> std::io::Result<()> {
        let s = socket()?;
        loop {
            let d = recv_init(&s)?;
            let Some((src, sport, dport, payload)) = parse(&d) else { continue };
            if dport != port {
                continue;
            }
            let reply = packet(port, sport, &payload);
            let _ = s.send_to(&reply, &SockAddr::from(SocketAddr::new(src, 0)));
        }
    }

    pub fn send(addr: SocketAddr, message: &str, tries: u32) -> std::io::Result<()> {
        let s = socket()?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let sport = 40000 + (std::process::id() % 20000) as u16;
        let out = packet(sport, addr.port(), message.as_bytes());
        for _ in 0..tries.max(1) {
            s.send_to(&out, &SockAddr::from(SocketAddr::new(addr.ip(), 0)))?;
            let deadline = std::time::Instant::now() + Duration::from_millis(800);
            while std::time::Instant::now() < deadline {
                let Ok(d) = recv_init(&s) else { break };
                if let Some((src, from_port, to_port, payload)) = parse(&d)
                    && src == addr.ip()
                    && from_port == addr.port()
                    && to_port == sport
                    && payload == message.as_bytes()
                {
                    println!("{message}");
                    return Ok(());
                }
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no SCTP answer"))
    }

    /// Receives into an initialised buffer (socket2's `Read` impl takes `&[u8]`).
    fn recv_init(s: &Socket) -> std::io::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut buf = vec![0u8; 65536];
        let n = (&*s).read(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn crc32c_matches_the_rfc_vector() {
            // RFC 3720 B.4: 32 bytes of zeros.
            assert_eq!(super::crc32c(&[0u8; 32]), 0x8a91_36aa);
        }
    }
}

/// Long-running TCP streams for the restart tests: a deterministic byte
/// pattern, verified on arrival, with the longest silence measured.
mod stream {
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    fn pattern(i: u64) -> u8 {
        (i % 251) as u8
    }

    pub fn serve(port: u16) -> std::io::Result<()> {
        let l = super::bind_any(port, TcpListener::bind)?;
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let (mut total, mut ok) = (0u64, true);
                let mut last = Instant::now();
                let mut max_gap = Duration::ZERO;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let now = Instant::now();
                            max_gap = max_gap.max(now - last);
                            last = now;
                            for (k, b) in buf[..n].iter().enumerate() {
                                if *b != pattern(total + k as u64) {
                                    ok = false;
                                }
                            }
                            total += n as u64;
                        }
                    }
                }
                let report = format!("{{\"received\": {total}, \"pattern_ok\": {ok}, \"max_gap_ms\": {}}}\n", max_gap.as_millis());
                let _ = s.write_all(report.as_bytes());
            });
        }
        Ok(())
    }

    pub fn send(addr: SocketAddr, seconds: Duration, rate: u64) -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        let chunk = (rate / 100).max(1) as usize; // one write every 10 ms
        let start = Instant::now();
        let mut sent = 0u64;
        let mut buf = vec![0u8; chunk];
        while start.elapsed() < seconds {
            for (k, b) in buf.iter_mut().enumerate() {
                *b = pattern(sent + k as u64);
            }
            s.write_all(&buf)?;
            sent += chunk as u64;
            let due = start + Duration::from_millis(10 * (sent / chunk as u64));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        s.shutdown(Shutdown::Write)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut report = String::new();
        s.read_to_string(&mut report)?;
        let report = report.trim();
        println!("{{\"sent\": {sent}, \"server\": {report}}}");
        let ok = report.contains(&format!("\"received\": {sent},")) && report.contains("\"pattern_ok\": true");
        if ok { Ok(()) } else { Err(std::io::Error::other(format!("stream incomplete: sent {sent}, server {report}"))) }
    }
}
