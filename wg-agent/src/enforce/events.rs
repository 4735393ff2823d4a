//! Datapath events (drops, auth-required signals): counted, and logged at
//! most once per flow per few seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use meshguard_ebpf::abi::Code;
use meshguard_ebpf::events::{Event, EventKind};
use meshguard_ebpf::policy::Direction;
use parking_lot::Mutex;

use super::EnforceState;

/// Logs and counts one datapath event. Drops are logged once per flow key
/// per `LOG_EVERY`, so a flood of denied packets is one line, not thousands.
pub fn report_event(state: &Mutex<EnforceState>, recent: &mut BTreeMap<String, std::time::Instant>, e: &Event) {
    const LOG_EVERY: Duration = Duration::from_secs(5);
    let mut st = state.lock();
    let name = |n: u32| st.names.get(&n).map_or_else(|| format!("identity:{n}"), ToString::to_string);
    let (subject, peer) = (name(e.subject), name(e.peer));
    let (src_id, dst_id) = match e.direction {
        Direction::Ingress => (peer.clone(), subject.clone()),
        Direction::Egress => (subject.clone(), peer.clone()),
    };
    let kind = match e.kind {
        EventKind::Drop(r) => Code::Drop(r).to_string(),
        EventKind::AuthRequired => "auth_required".to_owned(),
        // New flows are counted and streamed (observe), not logged: there are many.
        EventKind::Flow(_) => {
            *st.events.entry("flow".to_owned()).or_default() += 1;
            return;
        }
        EventKind::Unknown { r#type, reason } => format!("unknown:{type}:{reason}", type = r#type),
    };
    let rule = st.compiled.rule(e.cookie).map(|r| format!("{} {:?}[{}]", r.policy, r.direction, r.index));
    *st.events.entry(kind.clone()).or_default() += 1;
    drop(st);
    let flow = format!(
        "{}:{} -> {}:{} proto {}",
        e.src.map_or_else(|| "?".into(), |a| a.to_string()),
        e.sport,
        e.dst.map_or_else(|| "?".into(), |a| a.to_string()),
        e.dport,
        e.protocol
    );
    let key = format!("{kind} {src_id} {dst_id} {flow}");
    let now = std::time::Instant::now();
    if recent.get(&key).is_some_and(|t| now.duration_since(*t) < LOG_EVERY) {
        return;
    }
    recent.insert(key, now);
    if recent.len() > 4096 {
        recent.retain(|_, t| now.duration_since(*t) < LOG_EVERY);
    }
    let protocol = meshguard_common::policy::Protocol::from_number(e.protocol);
    // The 5-tuple as separate fields too, for JSON consumers to filter on;
    // ports only where the protocol has them.
    let ports = protocol.has_ports().then_some((e.sport, e.dport));
    tracing::info!(
        event = %kind,
        src_identity = %src_id,
        dst_identity = %dst_id,
        direction = ?e.direction,
        %protocol,
        src_addr = e.src.map(tracing::field::display),
        src_port = ports.map(|p| p.0),
        dst_addr = e.dst.map(tracing::field::display),
        dst_port = ports.map(|p| p.1),
        %flow,
        rule = %rule.as_deref().unwrap_or("default"),
        "datapath event"
    );
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn drop_event(protocol: u8) -> Event {
        Event { protocol, ..crate::managed::observe::tests::drop_event() }
    }

    /// JSON lines carry the 5-tuple as fields of their own (issue 18).
    #[test]
    fn a_drop_is_logged_with_its_five_tuple_as_separate_fields() {
        let buf = Buf::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt().json().with_writer(move || w.clone()).finish();
        let state = Mutex::new(EnforceState::default());
        tracing::subscriber::with_default(subscriber, || {
            report_event(&state, &mut BTreeMap::new(), &drop_event(6));
            report_event(&state, &mut BTreeMap::new(), &drop_event(1));
        });
        let text = String::from_utf8(buf.0.lock().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        let f = &lines[0]["fields"];
        assert_eq!(f["protocol"], "TCP");
        assert_eq!(f["src_addr"], "10.244.1.10");
        assert_eq!(f["src_port"], 40000);
        assert_eq!(f["dst_addr"], "10.244.2.10");
        assert_eq!(f["dst_port"], 7000);
        assert_eq!(f["event"], "DROP_POLICY_DEFAULT");
        // ICMP has no ports: none are logged.
        let f = &lines[1]["fields"];
        assert_eq!(f["protocol"], "ICMP");
        assert!(f.get("src_port").is_none() && f.get("dst_port").is_none(), "{f}");
    }
}
