//! `meshctl observe`: follows every node agent's event stream (a unix
//! socket per node, one JSON event per line) and prints the events that
//! pass the filters, as a table line or as JSON, like `hubble observe`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use meshguard_common::flow::FlowEvent;

use crate::cli::{CliError, ObserveArgs, Output, Verdict, state};
use crate::sim::cluster::Cluster;

/// The filters of one `observe`, resolved against the cluster.
pub struct Filter {
    ips: Option<Vec<std::net::IpAddr>>,
    identity: Option<String>,
    verdict: Option<&'static str>,
    protocol: Option<String>,
}

pub fn run(dir: &Path, args: &ObserveArgs) -> Result<ExitCode, CliError> {
    let c = state::require(dir)?;
    let filter = Filter::new(&c, args)?;
    let (tx, rx) = mpsc::channel::<Result<FlowEvent, String>>();
    for n in &c.nodes {
        let path = c.events_socket(&n.name);
        let stream = UnixStream::connect(&path).map_err(|e| {
            CliError::Failed(format!(
                "cannot follow {}'s events at {}: {e} (is its wg-agent running with a datapath?)",
                n.name,
                path.display()
            ))
        })?;
        let tx = tx.clone();
        let node = n.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let msg = match line {
                    Ok(l) => serde_json::from_str::<FlowEvent>(&l).map_err(|e| format!("{node}: unreadable event {l:?}: {e}")),
                    Err(e) => Err(format!("{node}: event stream ended: {e}")),
                };
                let end = msg.is_err();
                if tx.send(msg).is_err() || end {
                    return;
                }
            }
            let _ = tx.send(Err(format!("{node}: its agent closed the event stream")));
        });
    }
    drop(tx);
    if args.output == Output::Table {
        eprintln!("following {} node(s); Ctrl-C stops", c.nodes.len());
    }
    let mut shown = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let ev = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(ev)) => ev,
            Ok(Err(e)) => return Err(CliError::Failed(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(CliError::Failed("every event stream ended".into()));
            }
        };
        if !filter.matches(&ev) {
            continue;
        }
        let line = match args.output {
            Output::Json => serde_json::to_string(&ev).map_err(|e| CliError::Failed(e.to_string()))?,
            Output::Yaml => {
                format!("---\n{}", meshguard_common::yaml::to_string(&ev).map_err(|e| CliError::Failed(e.to_string()))?.trim_end())
            }
            Output::Table => render(&ev),
        };
        // A closed pipe (`| head`) ends the command quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(ExitCode::SUCCESS);
        }
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// `12:00:01.234 node-2 DROPPED (policy_default) TCP 10.244.1.11:40000 (spiffe://…/probe) -> 10.244.2.10:7000 (spiffe://…/api)`
pub fn render(e: &FlowEvent) -> String {
    if e.verdict == "lost" {
        return format!("{} {} LOST {} event(s): this reader fell behind", clock(e.time_ms), e.node, e.count.unwrap_or(0));
    }
    // ICMP carries no ports (the datapath reports the echo id there).
    let ports = matches!(e.protocol.as_str(), "TCP" | "UDP" | "SCTP");
    let addr = |ip: &Option<std::net::IpAddr>, port: u16| match (ip, port) {
        (Some(ip), p) if ports && p != 0 => format!("{ip}:{p}"),
        (Some(ip), _) => ip.to_string(),
        (None, _) => "?".into(),
    };
    let why = if e.reason.is_empty() { String::new() } else { format!(" ({})", e.reason) };
    let rule = e.rule.as_deref().map(|r| format!(" rule {r}")).unwrap_or_default();
    format!(
        "{} {} {}{} {} {} ({}) -> {} ({}){}",
        clock(e.time_ms),
        e.node,
        e.verdict.to_ascii_uppercase(),
        why,
        e.protocol,
        addr(&e.src_ip, e.src_port),
        e.src_identity,
        addr(&e.dst_ip, e.dst_port),
        e.dst_identity,
        rule
    )
}

/// UTC wall-clock time of day with milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", (s / 3600) % 24, (s / 60) % 60, s % 60, ms % 1000)
}

// === impl Filter ===

impl Filter {
    pub fn new(c: &Cluster, args: &ObserveArgs) -> Result<Self, CliError> {
        let ips = match &args.pod {
            Some(key) => {
                let p = c
                    .pods
                    .iter()
                    .find(|p| &p.key() == key)
                    .ok_or_else(|| CliError::Input(format!("no pod {key:?} in the cluster (pods are NAMESPACE/NAME)")))?;
                Some(vec![std::net::IpAddr::V4(p.ip)])
            }
            None => None,
        };
        if let Some(id) = &args.identity {
            id.parse::<meshguard_common::spiffe::SpiffeId>().map_err(|e| CliError::Input(format!("--identity {id:?}: {e}")))?;
        }
        let protocol = match &args.protocol {
            Some(p) => {
                Some(p.parse::<meshguard_common::policy::Protocol>().map_err(|e| CliError::Input(format!("--protocol: {e}")))?.to_string())
            }
            None => None,
        };
        let verdict = args.verdict.map(|v| match v {
            Verdict::Forwarded => "forwarded",
            Verdict::Dropped => "dropped",
            Verdict::AuthRequired => "auth_required",
        });
        Ok(Self { ips, identity: args.identity.clone(), verdict, protocol })
    }

    pub fn matches(&self, e: &FlowEvent) -> bool {
        // A `lost` notice concerns every filter: always shown.
        if e.verdict == "lost" {
            return true;
        }
        let ip_ok = self.ips.as_ref().is_none_or(|ips| ips.iter().any(|ip| e.src_ip == Some(*ip) || e.dst_ip == Some(*ip)));
        let id_ok = self.identity.as_ref().is_none_or(|id| &e.src_identity == id || &e.dst_identity == id);
        let verdict_ok = self.verdict.is_none_or(|v| e.verdict == v);
        let proto_ok = self.protocol.as_ref().is_none_or(|p| &e.protocol == p);
        ip_ok && id_ok && verdict_ok && proto_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(verdict: &str, proto: &str, src: &str, dst_id: &str) -> FlowEvent {
        FlowEvent {
            time_ms: 3_723_004,
            node: "node-2".into(),
            verdict: verdict.into(),
            reason: "policy_default".into(),
            direction: "ingress".into(),
            protocol: proto.into(),
            src_ip: Some(src.parse().unwrap()),
            src_port: 40000,
            dst_ip: Some("10.244.2.10".parse().unwrap()),
            dst_port: 7000,
            src_identity: "spiffe://cluster.local/ns/ops/sa/probe".into(),
            dst_identity: dst_id.into(),
            rule: None,
            count: None,
        }
    }

    #[test]
    fn filters_combine() {
        let f = Filter {
            ips: Some(vec!["10.244.1.11".parse().unwrap()]),
            identity: Some("spiffe://cluster.local/ns/shop/sa/api".into()),
            verdict: Some("dropped"),
            protocol: Some("TCP".into()),
        };
        let api = "spiffe://cluster.local/ns/shop/sa/api";
        assert!(f.matches(&ev("dropped", "TCP", "10.244.1.11", api)));
        assert!(!f.matches(&ev("dropped", "UDP", "10.244.1.11", api)));
        assert!(!f.matches(&ev("auth_required", "TCP", "10.244.1.11", api)));
        assert!(!f.matches(&ev("dropped", "TCP", "10.244.1.12", api)));
        assert!(!f.matches(&ev("dropped", "TCP", "10.244.1.11", "spiffe://cluster.local/ns/shop/sa/db")));
    }

    #[test]
    fn a_line_names_both_identities_and_the_five_tuple() {
        let line = render(&ev("dropped", "TCP", "10.244.1.11", "spiffe://cluster.local/ns/shop/sa/api"));
        assert_eq!(
            line,
            "01:02:03.004 node-2 DROPPED (policy_default) TCP 10.244.1.11:40000 (spiffe://cluster.local/ns/ops/sa/probe) -> \
             10.244.2.10:7000 (spiffe://cluster.local/ns/shop/sa/api)"
        );
    }

    #[test]
    fn the_agents_json_parses() {
        let line = r#"{"timeMs":1,"node":"node-1","verdict":"auth_required","reason":"","direction":"egress","protocol":"UDP","srcIp":"10.244.1.10","srcPort":5,"dstIp":"10.244.2.10","dstPort":53,"srcIdentity":"a","dstIdentity":"b","rule":null,"count":null}"#;
        let e: FlowEvent = serde_json::from_str(line).unwrap();
        assert_eq!((e.verdict.as_str(), e.dst_port), ("auth_required", 53));
    }
}
