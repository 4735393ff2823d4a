//! The cross-platform WireGuard configuration protocol ("UAPI",
//! <https://www.wireguard.com/xplatform/>), as the stock `wg` tool speaks it
//! to wireguard-go over `/var/run/wireguard/<ifname>.sock`.
//!
//! Parsing is pure and separate from the socket ([`server`]). A `set`
//! request is parsed whole before anything is applied, so a malformed request
//! changes nothing — stricter than wireguard-go, which applies line by line.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::UNIX_EPOCH;

use ipnet::IpNet;
use meshguard_common::key::{PublicKey, SecretKey};

use crate::device::{DeviceSnapshot, DeviceUpdate, PeerUpdate};

pub mod server;

/// Errno values the protocol reports, negated on the wire as wireguard-go does.
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EPROTO: i32 = 71;
    pub const EADDRINUSE: i32 = 98;
}

/// Longest line we accept; real lines are under 100 bytes.
pub const MAX_LINE_LEN: usize = 4096;
/// Most lines in one request: enough for tens of thousands of peers.
pub const MAX_REQUEST_LINES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UapiError {
    /// Positive errno; sent as `errno=-<n>`.
    pub errno: i32,
    pub message: String,
}

impl UapiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self { errno: errno::EINVAL, message: message.into() }
    }

    fn protocol(message: impl Into<String>) -> Self {
        Self { errno: errno::EPROTO, message: message.into() }
    }
}

/// The operation named by a request's first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Get,
    Set,
}

pub fn parse_operation(line: &str) -> Result<Operation, UapiError> {
    match line {
        "get=1" => Ok(Operation::Get),
        "set=1" => Ok(Operation::Set),
        other => Err(UapiError::protocol(format!("unknown operation {other:?}: expected get=1 or set=1"))),
    }
}

fn parse_bool_true(key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" { Ok(()) } else { Err(UapiError::invalid(format!("{key} only takes the value true, got {value:?}"))) }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    value.parse().map_err(|_| UapiError::invalid(format!("invalid {key} {value:?}")))
}

fn parse_secret(key: &str, value: &str) -> Result<Option<SecretKey>, UapiError> {
    let k = SecretKey::from_hex(value).map_err(|e| UapiError::invalid(format!("invalid {key}: {e}")))?;
    // The all-zero key means "remove", as in the protocol.
    Ok((!k.is_zero()).then_some(k))
}

/// Parses the body of a `set=1` request (the lines after it, without the
/// terminating blank line).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<DeviceUpdate, UapiError> {
    let mut update = DeviceUpdate::default();
    let mut peer: Option<PeerUpdate> = None;
    for line in lines {
        let (key, value) =
            line.split_once('=').ok_or_else(|| UapiError::protocol(format!("malformed line {line:?}: expected key=value")))?;
        if key == "public_key" {
            if let Some(p) = peer.take() {
                update.peers.push(p);
            }
            let pk = PublicKey::from_hex(value).map_err(|e| UapiError::invalid(format!("invalid public_key: {e}")))?;
            peer = Some(PeerUpdate::new(pk));
            continue;
        }
        match peer.as_mut() {
            None => match key {
                "private_key" => update.private_key = Some(parse_secret(key, value)?),
                "listen_port" => update.listen_port = Some(parse_num(key, value)?),
                "fwmark" => update.fwmark = Some(parse_num(key, value)?),
                "replace_peers" => {
                    parse_bool_true(key, value)?;
                    update.replace_peers = true;
                }
                _ => return Err(UapiError::invalid(format!("invalid device key {key:?}"))),
            },
            Some(p) => match key {
                "remove" => {
                    parse_bool_true(key, value)?;
                    p.remove = true;
                }
                "update_only" => {
                    parse_bool_true(key, value)?;
                    p.update_only = true;
                }
                "preshared_key" => p.preshared_key = Some(parse_secret(key, value)?),
                "endpoint" => {
                    let ep: SocketAddr = parse_num(key, value)?;
                    if ep.port() == 0 || ep.ip().is_unspecified() {
                        return Err(UapiError::invalid(format!("endpoint {value:?} has no address or port")));
                    }
                    p.endpoint = Some(ep);
                }
                "persistent_keepalive_interval" => p.persistent_keepalive = Some(parse_num(key, value)?),
                "replace_allowed_ips" => {
                    parse_bool_true(key, value)?;
                    p.replace_allowed_ips = true;
                }
                "allowed_ip" => {
                    let net: IpNet = parse_num(key, value)?;
                    p.allowed_ips.push(net.trunc());
                }
                "protocol_version" => {
                    if value != "1" {
                        return Err(UapiError::invalid(format!("unsupported protocol_version {value:?}")));
                    }
                }
                _ => return Err(UapiError::invalid(format!("invalid peer key {key:?}"))),
            },
        }
    }
    if let Some(p) = peer.take() {
        update.peers.push(p);
    }
    Ok(update)
}

/// The body of a `get=1` reply (without the final `errno=0` and blank line).
pub fn format_get(s: &DeviceSnapshot) -> String {
    let mut out = String::with_capacity(256 + s.peers.len() * 256);
    if let Some(k) = &s.private_key {
        let _ = writeln!(out, "private_key={}", k.to_hex());
    }
    if s.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", s.listen_port);
    }
    if s.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", s.fwmark);
    }
    for p in &s.peers {
        let _ = writeln!(out, "public_key={}", p.public_key.to_hex());
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(out, "preshared_key={}", k.to_hex());
        }
        let _ = writeln!(out, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(out, "endpoint={ep}");
        }
        let (sec, nsec) =
            p.last_handshake.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(out, "persistent_keepalive_interval={}", p.persistent_keepalive);
        for net in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const K2: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376";

    fn set(text: &str) -> Result<DeviceUpdate, UapiError> {
        parse_set(text.lines())
    }

    #[test]
    fn parses_a_full_set_request() {
        let u = set(&format!(
            "private_key={K1}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n\
             public_key={K2}\npreshared_key={}\nendpoint=[fd00::1]:51821\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.1/24\nallowed_ip=fd00::/64\nprotocol_version=1\n\
             public_key={K1}\nremove=true",
            "0".repeat(64)
        ))
        .unwrap();
        assert!(u.private_key.as_ref().unwrap().is_some());
        assert_eq!(u.listen_port, Some(51820));
        assert_eq!(u.fwmark, Some(0));
        assert!(u.replace_peers);
        assert_eq!(u.peers.len(), 2);
        let p = &u.peers[0];
        assert_eq!(p.preshared_key.as_ref().map(Option::is_none), Some(true));
        assert_eq!(p.endpoint, Some("[fd00::1]:51821".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.allowed_ips, vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()]);
        assert!(u.peers[1].remove);
    }

    #[test]
    fn rejects_malformed_requests_with_the_right_errno() {
        let cases = [
            ("listen_port=99999".to_owned(), errno::EINVAL),
            ("listen_port".to_owned(), errno::EPROTO),
            ("private_key=abc".to_owned(), errno::EINVAL),
            ("bogus=1".to_owned(), errno::EINVAL),
            (format!("public_key={K1}\nlisten_port=1"), errno::EINVAL),
            (format!("public_key={K1}\nendpoint=nowhere"), errno::EINVAL),
            (format!("public_key={K1}\nendpoint=1.2.3.4:0"), errno::EINVAL),
            (format!("public_key={K1}\nallowed_ip=10.0.0.0/33"), errno::EINVAL),
            (format!("public_key={K1}\nprotocol_version=2"), errno::EINVAL),
            (format!("public_key={K1}\nremove=false"), errno::EINVAL),
            ("replace_peers=yes".to_owned(), errno::EINVAL),
        ];
        for (text, want) in cases {
            assert_eq!(set(&text).unwrap_err().errno, want, "{text}");
        }
        assert_eq!(parse_operation("del=1").unwrap_err().errno, errno::EPROTO);
    }
}
