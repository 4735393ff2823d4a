//! A datapath event as node agents stream it to observers (`meshctl
//! observe`, or any tool that reads the agent's events socket): one JSON
//! object per line. The shape is documented in docs/meshctl.md.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One event: a drop or an auth-required signal, with both identities and the 5-tuple.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowEvent {
    /// Unix time in milliseconds, when the agent read it.
    pub time_ms: u64,
    pub node: String,
    /// `forwarded` (a new flow admitted), `dropped`, `auth_required`, or
    /// `lost` (then `count` says how many).
    pub verdict: String,
    /// Why, lowercase (`policy_allow`, `unselected`, `policy_default`, `spoofed_ip`, ...); empty for auth signals.
    #[serde(default)]
    pub reason: String,
    /// The pod's view: `ingress` (to the pod) or `egress` (from it).
    #[serde(default)]
    pub direction: String,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub src_ip: Option<IpAddr>,
    #[serde(default)]
    pub src_port: u16,
    #[serde(default)]
    pub dst_ip: Option<IpAddr>,
    #[serde(default)]
    pub dst_port: u16,
    #[serde(default)]
    pub src_identity: String,
    #[serde(default)]
    pub dst_identity: String,
    /// The policy rule that decided, for explicit denies.
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub count: Option<u64>,
}

// === impl FlowEvent ===

impl FlowEvent {
    /// The notice a reader gets in place of `count` events it was too slow for.
    pub fn lost(time_ms: u64, node: &str, count: u64) -> Self {
        Self {
            time_ms,
            node: node.to_owned(),
            verdict: "lost".into(),
            reason: String::new(),
            direction: String::new(),
            protocol: String::new(),
            src_ip: None,
            src_port: 0,
            dst_ip: None,
            dst_port: 0,
            src_identity: String::new(),
            dst_identity: String::new(),
            rule: None,
            count: Some(count),
        }
    }
}
