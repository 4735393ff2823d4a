//! meshguard's node agent.
//!
//! - [`device`]: a userspace WireGuard device — boringtun's noise protocol
//!   (`Tunn`) driven by meshguard's own I/O loops ([`io`]).
//! - [`uapi`]: the cross-platform configuration protocol, so the stock `wg`
//!   tool configures a `wg-agent device` exactly as it does wireguard-go.
//! - [`enforce`]: the eBPF policy datapath kept in step with the view and
//!   the local pods (the enforcer, the policy compiler, endpoint sync).
//! - [`managed`]: the node agent proper — node key, cluster view, peers and
//!   routes for remote pod CIDRs, strict mode.

#![deny(rust_2018_idioms)]
// Unsafe is confined to the TUN/socket edges (`io::tun`, `io::udp`), each
// block with a SAFETY comment.
#![deny(unsafe_code)]

pub mod allowed_ips;
pub mod device;
pub mod enforce;
pub mod io;
pub mod managed;
pub mod packet;
pub mod uapi;
