//! A UAPI client for tests: reads a userspace WireGuard device's state
//! straight from its socket, as the `wg` tool does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct WgDevice {
    pub listen_port: u16,
    pub peers: Vec<WgPeer>,
}

#[derive(Debug, Clone, Default)]
pub struct WgPeer {
    /// Hex, as UAPI carries it.
    pub public_key_hex: String,
    pub endpoint: Option<String>,
    pub last_handshake_sec: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub allowed_ips: Vec<String>,
}

pub fn socket_path(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.sock"))
}

/// Sends raw request text and returns the raw reply (up to the blank line).
pub fn request(sock: &Path, text: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(text.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut out = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        if line == "\n" {
            break;
        }
        out.push_str(&line);
    }
    Ok(out)
}

/// The errno a reply ends with (0 on success).
pub fn reply_errno(reply: &str) -> Option<i64> {
    reply.lines().find_map(|l| l.strip_prefix("errno=")).and_then(|v| v.parse().ok())
}

pub fn get(sock: &Path) -> std::io::Result<WgDevice> {
    let reply = request(sock, "get=1\n\n")?;
    if reply_errno(&reply) != Some(0) {
        return Err(std::io::Error::other(format!("get failed: {reply}")));
    }
    let mut dev = WgDevice::default();
    for line in reply.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k {
            "private_key" => {}
            "listen_port" => dev.listen_port = v.parse().unwrap_or(0),
            "public_key" => dev.peers.push(WgPeer { public_key_hex: v.into(), ..Default::default() }),
            _ => {
                let Some(p) = dev.peers.last_mut() else { continue };
                match k {
                    "endpoint" => p.endpoint = Some(v.into()),
                    "last_handshake_time_sec" => p.last_handshake_sec = v.parse().unwrap_or(0),
                    "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                    "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                    "allowed_ip" => p.allowed_ips.push(v.into()),
                    _ => {}
                }
            }
        }
    }
    Ok(dev)
}
