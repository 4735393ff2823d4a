//! Captures on the underlay with tcpdump, and the judgement tests make of
//! them: what crossed between nodes, and whether anything was in plaintext.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use crate::sim::cluster::{ClusterError, Result, wait_until};

pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
    log: PathBuf,
}

/// What a capture contained.
#[derive(Debug, Default)]
pub struct Report {
    pub frames: usize,
    /// UDP datagrams between node endpoints that parse as WireGuard messages.
    pub wireguard: usize,
    pub arp: usize,
    /// IPv6 neighbour discovery and MLD from link-local addresses, and IGMP
    /// to link-local multicast: what interfaces say when they come up.
    pub link_control: usize,
    /// TCP to or from a control-plane address (the CA's TLS port), see [`judge_with`].
    pub control_plane: usize,
    /// Everything that should never be on the underlay, described.
    pub violations: Vec<String>,
}

// === impl Capture ===

impl Capture {
    /// Starts `tcpdump -i <iface>` in `netns`, writing to `file`; returns once it listens.
    pub fn start(netns: &str, iface: &str, file: &Path) -> Result<Self> {
        let log = file.with_extension("log");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "-i", iface, "-nn", "-U", "--immediate-mode", "-s", "0", "-w"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut cap = Self { child: Some(child), file: file.to_owned(), log };
        wait_until("tcpdump to listen", Duration::from_secs(10), || {
            std::fs::read_to_string(&cap.log).is_ok_and(|l| l.contains("listening on"))
        })?;
        if let Some(c) = cap.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(ClusterError::Invalid(format!("tcpdump exited: {status}")));
        }
        Ok(cap)
    }

    /// Stops tcpdump (flushing its file) and returns the raw frames.
    pub fn stop(self) -> Result<Vec<Vec<u8>>> {
        Ok(self.stop_timed()?.into_iter().map(|(_, f)| f).collect())
    }

    /// Stops tcpdump and returns each frame with the time it was captured.
    pub fn stop_timed(mut self) -> Result<Vec<(SystemTime, Vec<u8>)>> {
        if let Some(mut c) = self.child.take() {
            // Let the last frames reach the file before tcpdump is told to stop.
            std::thread::sleep(Duration::from_millis(300));
            let _ = crate::sim::cmd::run("kill", &["-INT", &c.id().to_string()]);
            let _ = c.wait();
        }
        read_pcap_timed(&self.file)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn read_pcap(file: &Path) -> Result<Vec<Vec<u8>>> {
    Ok(read_pcap_timed(file)?.into_iter().map(|(_, f)| f).collect())
}

/// Every frame of a pcap file with its capture time.
pub fn read_pcap_timed(file: &Path) -> Result<Vec<(SystemTime, Vec<u8>)>> {
    let f = std::fs::File::open(file)?;
    let mut r = pcap_file::pcap::PcapReader::new(f).map_err(|e| ClusterError::Invalid(format!("pcap: {e}")))?;
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.map_err(|e| ClusterError::Invalid(format!("pcap: {e}")))?;
        out.push((SystemTime::UNIX_EPOCH + p.timestamp, p.data.into_owned()));
    }
    Ok(out)
}

/// Whether any frame carries `needle` (e.g. a probe's marker) in the clear.
pub fn frames_contain(frames: &[Vec<u8>], needle: &[u8]) -> bool {
    frames.iter().any(|f| contains(f, needle))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn is_pod_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..2] == [10, 244],
        IpAddr::V6(_) => false,
    }
}

/// Judges an underlay capture: only WireGuard between node endpoints on
/// `wg_port`, ARP, and IPv6 link-local control traffic are acceptable;
/// `markers` must appear nowhere.
pub fn judge(frames: &[Vec<u8>], wg_port: u16, markers: &[&[u8]]) -> Report {
    judge_with(frames, wg_port, markers, &[])
}

/// [`judge`], where TCP to or from one of `control` (e.g. identity-ca's
/// TLS port: nodes reach their CA over the underlay) is counted as
/// control-plane traffic instead of a violation. Markers are still searched
/// in every frame.
pub fn judge_with(frames: &[Vec<u8>], wg_port: u16, markers: &[&[u8]], control: &[SocketAddr]) -> Report {
    let mut r = Report { frames: frames.len(), ..Default::default() };
    for (i, f) in frames.iter().enumerate() {
        for m in markers {
            if contains(f, m) {
                r.violations.push(format!("frame {i}: marker {:?} in plaintext", String::from_utf8_lossy(m)));
            }
        }
        let p = match SlicedPacket::from_ethernet(f) {
            Ok(p) => p,
            Err(e) => {
                r.violations.push(format!("frame {i}: unparseable ({e})"));
                continue;
            }
        };
        let Some(net) = &p.net else {
            // No IP layer: ARP is expected; anything else is not.
            if f.len() >= 14 && f[12..14] == [0x08, 0x06] {
                r.arp += 1;
            } else {
                r.violations.push(format!("frame {i}: non-IP ethertype {:02x}{:02x}", f[12], f[13]));
            }
            continue;
        };
        let (src, dst): (IpAddr, IpAddr) = match net {
            NetSlice::Ipv4(v4) => (v4.header().source_addr().into(), v4.header().destination_addr().into()),
            NetSlice::Ipv6(v6) => (v6.header().source_addr().into(), v6.header().destination_addr().into()),
        };
        if is_pod_address(src) || is_pod_address(dst) {
            r.violations.push(format!("frame {i}: pod address on the underlay {src} -> {dst}"));
            continue;
        }
        match (&p.transport, net) {
            (Some(TransportSlice::Tcp(t)), _)
                if control.contains(&SocketAddr::new(src, t.source_port()))
                    || control.contains(&SocketAddr::new(dst, t.destination_port())) =>
            {
                r.control_plane += 1;
            }
            (Some(TransportSlice::Udp(u)), _) if u.source_port() == wg_port || u.destination_port() == wg_port => {
                let payload = u.payload();
                let wg = payload.len() >= 4 && (1..=4).contains(&payload[0]) && payload[1..4] == [0, 0, 0];
                if wg {
                    r.wireguard += 1;
                } else {
                    r.violations.push(format!("frame {i}: non-WireGuard payload on the WireGuard port {src} -> {dst}"));
                }
            }
            (Some(TransportSlice::Icmpv6(_)), NetSlice::Ipv6(v6))
                if v6.header().source_addr().segments()[0] & 0xffc0 == 0xfe80 || v6.header().source_addr().is_unspecified() =>
            {
                r.link_control += 1;
            }
            (_, NetSlice::Ipv4(v4))
                if v4.header().protocol() == etherparse::IpNumber::IGMP && v4.header().destination()[..3] == [224, 0, 0] =>
            {
                r.link_control += 1;
            }
            _ => r.violations.push(format!("frame {i}: unexpected traffic {src} -> {dst}")),
        }
    }
    r
}
