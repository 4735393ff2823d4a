//! `mg-probe`: the traffic tool the tests run inside pod and node namespaces.
//! Echo servers and clients for TCP and UDP, a bare HTTP GET, and a sprayer
//! of arbitrary datagrams. Exit status 0 means "it worked as asked".

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mg-probe", about = "meshguard test traffic tool")]
struct Cli {
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
    let result = match Cli::parse().cmd {
        Cmd::Serve { port } => serve(port),
        Cmd::Tcp { addr, message, timeout } => tcp(addr, &message, Duration::from_secs(timeout)),
        Cmd::Udp { addr, message, tries } => udp(addr, &message, tries),
        Cmd::HttpGet { addr, path } => http_get(addr, &path),
        Cmd::Spray { addr, count, len, hex } => spray(addr, count, len, hex.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mg-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(port: u16) -> std::io::Result<()> {
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
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

fn tcp(addr: SocketAddr, message: &str, timeout: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
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
    if !head.starts_with("HTTP/1.") || !head.split_whitespace().nth(1).is_some_and(|c| c == "200") {
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
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}
