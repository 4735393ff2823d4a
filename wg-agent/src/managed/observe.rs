//! The node's live event stream, like Hubble's: every datapath event
//! (drops, auth-required signals) with both identities and the 5-tuple, as
//! one JSON object per line on a unix socket (`eventsSocket`, 0600) that
//! `meshctl observe` and any other tool can follow.
//!
//! Unlike the log, which shows a flow's drops once per 5 s, the stream
//! carries every event. A reader that falls behind loses events, never
//! slows the datapath: it is told how many with a `lost` line.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshguard_common::flow::FlowEvent;
use meshguard_ebpf::abi::Code;
use meshguard_ebpf::events::{Event, EventKind};
use meshguard_ebpf::policy::Direction;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::broadcast;

use crate::enforce::EnforceState;

/// Events buffered per reader before it is told it lost some.
const READER_BUFFER: usize = 4096;

/// Fans events out to every connected reader.
#[derive(Clone)]
pub struct EventHub {
    node: String,
    tx: broadcast::Sender<Arc<FlowEvent>>,
}

// === impl EventHub ===

impl EventHub {
    pub fn new(node: &str) -> Self {
        let (tx, _) = broadcast::channel(READER_BUFFER);
        Self { node: node.to_owned(), tx }
    }

    /// Names the event's identities and sends it to every reader (none is fine).
    pub fn publish(&self, state: &Mutex<EnforceState>, e: &Event) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Arc::new(self.describe(state, e)));
    }

    fn describe(&self, state: &Mutex<EnforceState>, e: &Event) -> FlowEvent {
        let st = state.lock();
        let name = |n: u32| st.names.get(&n).map_or_else(|| format!("identity:{n}"), ToString::to_string);
        let (subject, peer) = (name(e.subject), name(e.peer));
        let (src_identity, dst_identity) = match e.direction {
            Direction::Ingress => (peer, subject),
            Direction::Egress => (subject, peer),
        };
        let (verdict, reason) = match e.kind {
            EventKind::Drop(r) => ("dropped", Code::Drop(r).to_string().to_ascii_lowercase().trim_start_matches("drop_").to_owned()),
            EventKind::AuthRequired => ("auth_required", String::new()),
            EventKind::Flow(r) => ("forwarded", Code::Forward(r).to_string().to_ascii_lowercase().trim_start_matches("fwd_").to_owned()),
            EventKind::Unknown { r#type, reason } => ("unknown", format!("{type}:{reason}", type = r#type)),
        };
        let rule = st.compiled.rule(e.cookie).map(|r| format!("{} {:?}[{}]", r.policy, r.direction, r.index));
        FlowEvent {
            time_ms: now_ms(),
            node: self.node.clone(),
            verdict: verdict.into(),
            reason,
            direction: format!("{:?}", e.direction).to_ascii_lowercase(),
            protocol: meshguard_common::policy::Protocol::from_number(e.protocol).to_string(),
            src_ip: e.src,
            src_port: e.sport,
            dst_ip: e.dst,
            dst_port: e.dport,
            src_identity,
            dst_identity,
            rule,
            count: None,
        }
    }

    /// Serves the stream on `path` until the task is dropped.
    pub fn serve(&self, path: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket left by a previous run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let hub = self.clone();
        let path: PathBuf = path.to_owned();
        Ok(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(feed(stream, hub.tx.subscribe(), hub.node.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, socket = %path.display(), "event stream: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }))
    }
}

/// Writes events to one reader until it goes away.
async fn feed(mut stream: tokio::net::UnixStream, mut rx: broadcast::Receiver<Arc<FlowEvent>>, node: String) {
    loop {
        let line = match rx.recv().await {
            Ok(e) => serde_json::to_string(&*e),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(lost = n, "event stream reader too slow; events dropped for it");
                serde_json::to_string(&FlowEvent::lost(now_ms(), &node, n))
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Ok(mut line) = line else { continue };
        line.push('\n');
        if stream.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    /// A policy drop of TCP 10.244.1.10:40000 -> 10.244.2.10:7000 (also
    /// the log tests' fixture, enforce::events).
    pub(crate) fn drop_event() -> Event {
        Event {
            kind: EventKind::Drop(meshguard_ebpf::abi::DropReason::PolicyDefault),
            direction: Direction::Ingress,
            ifindex: 7,
            subject: 300,
            peer: 301,
            peer_node: 2,
            cookie: 0,
            protocol: 6,
            src: Some("10.244.1.10".parse().unwrap()),
            dst: Some("10.244.2.10".parse().unwrap()),
            sport: 40000,
            dport: 7000,
            timestamp_boot_ns: 1,
            frame: Vec::new(),
        }
    }

    #[tokio::test]
    async fn readers_get_every_event_with_identities_and_the_five_tuple() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("events.sock");
        let hub = EventHub::new("node-2");
        let _server = hub.serve(&sock).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
        let state = Mutex::new(EnforceState::default());
        state.lock().names.insert(300, "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap());
        state.lock().names.insert(301, "spiffe://cluster.local/ns/ops/sa/probe".parse().unwrap());

        let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        // The reader is registered once the server accepted it.
        while hub.tx.receiver_count() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        for _ in 0..3 {
            hub.publish(&state, &drop_event());
        }
        for _ in 0..3 {
            let line = lines.next_line().await.unwrap().unwrap();
            let e: FlowEvent = serde_json::from_str(&line).unwrap();
            assert_eq!(e.verdict, "dropped");
            assert_eq!(e.reason, "policy_default");
            assert_eq!(e.src_identity, "spiffe://cluster.local/ns/ops/sa/probe");
            assert_eq!(e.dst_identity, "spiffe://cluster.local/ns/shop/sa/api");
            assert_eq!((e.protocol.as_str(), e.dst_port, e.node.as_str()), ("TCP", 7000, "node-2"));
        }
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_told_what_it_lost() {
        let hub = EventHub::new("n");
        let rx = hub.tx.subscribe();
        let state = Mutex::new(EnforceState::default());
        for _ in 0..READER_BUFFER + 10 {
            hub.publish(&state, &drop_event());
        }
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(feed(a, rx, "n".into()));
        let mut lines = tokio::io::BufReader::new(b).lines();
        let first: FlowEvent = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!((first.verdict.as_str(), first.count), ("lost", Some(10)));
    }
}
