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
    tracing::info!(
        event = %kind,
        src_identity = %src_id,
        dst_identity = %dst_id,
        direction = ?e.direction,
        %flow,
        rule = %rule.as_deref().unwrap_or("default"),
        "datapath event"
    );
}
