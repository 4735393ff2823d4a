//! Kernel routes for the mesh, kept in step with the cluster view over netlink.
//!
//! Every route the agent installs carries its own protocol number, so a
//! restarted agent finds (and keeps or removes) exactly its own routes.
//!
//! - remote pod CIDRs → the tunnel interface;
//! - strict mode: the cluster CIDRs → the tunnel too (a destination without
//!   a peer reaches the agent, which drops and counts it), and a blackhole for
//!   the cluster CIDRs at a worse metric, which is what remains if the tunnel
//!   interface itself disappears. Either way nothing leaves in plaintext.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

/// Marks meshguard's routes (`ip route show proto 201`).
pub const ROUTE_PROTOCOL: u8 = 201;
/// Metric of routes through the tunnel.
pub const TUNNEL_METRIC: u32 = 100;
/// Metric of the strict-mode blackhole: below every real route in preference.
pub const BLACKHOLE_METRIC: u32 = 0xffff;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("netlink refused {what} for {dst}: {source}")]
    Netlink {
        what: &'static str,
        dst: IpNet,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot list routes: {0}")]
    List(#[source] rtnetlink::Error),
    #[error("cannot delete the interface: {0}")]
    Link(#[source] rtnetlink::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Tunnel,
    Blackhole,
}

/// One route meshguard wants in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MeshRoute {
    pub dst: IpNet,
    pub kind: RouteKind,
}

/// Turns off IPv6 address generation on interface `ifindex` (call before
/// it goes up): a link-local address on the tunnel would only send router
/// solicitations no peer can take, counted as drops. Netlink, not
/// `/proc/sys`, which is read-only in a container.
pub async fn no_ipv6_link_local(ifindex: u32) -> Result<(), RouteError> {
    use rtnetlink::packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute};
    let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Connect)?;
    let task = tokio::spawn(conn);
    let mut msg = rtnetlink::LinkUnspec::new_with_index(ifindex).build();
    msg.attributes.push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)])]));
    let result = handle.link().set(msg).execute().await.map_err(RouteError::Link);
    task.abort();
    result
}

pub struct Routes {
    handle: Handle,
    ifindex: u32,
    _conn: tokio::task::JoinHandle<()>,
}

// === impl Routes ===

impl Routes {
    pub fn new(ifindex: u32) -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Connect)?;
        let task = tokio::spawn(conn);
        Ok(Self { handle, ifindex, _conn: task })
    }

    /// Makes meshguard's routes exactly `want`: adds what is missing, removes
    /// what is no longer wanted, leaves everything else alone.
    pub async fn sync(&self, want: &BTreeSet<MeshRoute>) -> Result<(), RouteError> {
        let have = self.list_own().await?;
        let have_set: BTreeSet<MeshRoute> = have.iter().filter_map(|(r, _)| *r).collect();
        for route in want.difference(&have_set) {
            self.add(route).await?;
        }
        for (route, msg) in have {
            if route.is_none_or(|r| !want.contains(&r)) {
                let dst = route.map_or_else(|| "0.0.0.0/0".parse().unwrap(), |r| r.dst);
                self.handle.route().del(msg).execute().await.map_err(|source| RouteError::Netlink {
                    what: "route removal",
                    dst,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Adds whichever of `want` is missing and removes nothing: before the
    /// view is known, the routes a previous run left stay.
    pub async fn ensure(&self, want: &BTreeSet<MeshRoute>) -> Result<(), RouteError> {
        let have: BTreeSet<MeshRoute> = self.list_own().await?.into_iter().filter_map(|(r, _)| r).collect();
        for route in want.difference(&have) {
            self.add(route).await?;
        }
        Ok(())
    }

    /// Deletes an interface (the persistent tunnel, at uninstall).
    pub async fn delete_link(&self, ifindex: u32) -> Result<(), RouteError> {
        self.handle.link().del(ifindex).execute().await.map_err(RouteError::Link)
    }

    async fn add(&self, route: &MeshRoute) -> Result<(), RouteError> {
        let err = |source| RouteError::Netlink { what: "route", dst: route.dst, source };
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.dst.addr(), route.dst.prefix_len())
            .expect("IpNet prefixes are valid")
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        let msg = match route.kind {
            RouteKind::Tunnel => builder.output_interface(self.ifindex).priority(TUNNEL_METRIC).build(),
            RouteKind::Blackhole => builder.kind(RouteType::BlackHole).priority(BLACKHOLE_METRIC).build(),
        };
        self.handle.route().add(msg).replace().execute().await.map_err(err)
    }

    /// Our routes (by protocol), each with what it means, if it is one we
    /// understand; anything else with our protocol is removed by `sync`.
    async fn list_own(&self) -> Result<Vec<(Option<MeshRoute>, RouteMessage)>, RouteError> {
        let mut out = Vec::new();
        for filter in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
            let mut stream = self.handle.route().get(filter).execute();
            while let Some(msg) = stream.try_next().await.map_err(RouteError::List)? {
                if msg.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let parsed = self.parse(&msg);
                out.push((parsed, msg));
            }
        }
        Ok(out)
    }

    fn parse(&self, msg: &RouteMessage) -> Option<MeshRoute> {
        let len = msg.header.destination_prefix_length;
        let mut dst = None;
        let mut oif = None;
        for a in &msg.attributes {
            match a {
                RouteAttribute::Destination(d) => {
                    dst = match d {
                        rtnetlink::packet_route::route::RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                        rtnetlink::packet_route::route::RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                        _ => None,
                    }
                }
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let dst = match dst {
            Some(ip) => IpNet::new(ip, len).ok()?,
            None if len == 0 => match msg.header.address_family {
                AddressFamily::Inet6 => IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).ok()?,
                _ => IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).ok()?,
            },
            None => return None,
        };
        match msg.header.kind {
            RouteType::BlackHole => Some(MeshRoute { dst, kind: RouteKind::Blackhole }),
            RouteType::Unicast if oif == Some(self.ifindex) => Some(MeshRoute { dst, kind: RouteKind::Tunnel }),
            _ => None,
        }
    }
}
