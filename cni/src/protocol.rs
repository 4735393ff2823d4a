//! The hand-off between the plugin and the node agent: one JSON request and
//! one JSON response per connection on the agent's Unix socket (root only).
//! The agent answers ADD only after its enforcer has taken up the pod's
//! interface, so a pod never starts unenforced.
//!
//! Both sides use these types (the agent depends on this crate), so the
//! shape is defined once; unknown fields are refused, never guessed at.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use meshguard_common::cluster::LocalEndpoint;
use serde::{Deserialize, Serialize};

use crate::spec::code;

/// Where the agent serves the hand-off (its `cniSocket`, the plugin's `agentSocket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/meshguard/cni.sock";
/// Either message: a pod's description is well under 1 KiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// Enforce the pod (write its endpoint file, sync, judge the result).
    Add(AddPod),
    /// Forget the pod (remove its endpoint file, detach); idempotent.
    Del(DelPod),
    /// Whether the pod is still enforced or held closed.
    Check(CheckPod),
    /// Whether ADD can be served (the datapath is loaded).
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddPod {
    /// For the agent's log: which sandbox asked.
    pub container_id: String,
    pub endpoint: LocalEndpoint,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelPod {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    /// The host interface ADD handed over, when DEL's `prevResult` names it:
    /// a file naming another interface belongs to a newer sandbox of the
    /// same pod and stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckPod {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub interface: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// ADD, CHECK: programs on, anti-spoofing and policy for this identity.
    Enforced { interface: String, identity: u32 },
    /// ADD, CHECK: programs on, every packet dropped until the cluster view
    /// names the pod (the normal start of a pod's life). Enforced too.
    HeldClosed { interface: String, detail: String },
    /// DEL: the endpoint file is gone and the interface detached (`existed`:
    /// whether there was anything to remove).
    Removed { existed: bool },
    /// STATUS: the datapath is loaded.
    Ready,
    /// Nothing was changed (or whatever was, was undone), and why.
    Refused { reason: Refusal, message: String },
}

/// Why the agent refused. Stable: metric labels and the plugin's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Malformed, oversized or slow request, or invalid names, MAC or addresses.
    InvalidRequest,
    /// The agent runs without a policy datapath and enforces no pod.
    NoDatapath,
    /// The agent has not loaded its datapath yet (start-up).
    DatapathLoading,
    /// Another pod's endpoint file names the interface, or the pod is still
    /// enforced on another (live) interface.
    ConflictingEndpoint,
    /// The enforcer could not enforce the interface (attach failed, ...).
    NotEnforced,
    /// CHECK: the agent has no such pod on that interface.
    UnknownPod,
    /// The endpoint file could not be written or removed.
    Io,
}

/// A failed call to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No agent answers on the socket (absent, refused, silent).
    Unreachable(String),
    /// Something answered, but not this protocol.
    Protocol(String),
}

// === impl Request ===

impl Request {
    /// The command's name, for logs and metric labels.
    pub const fn command(&self) -> &'static str {
        match self {
            Self::Add(_) => "add",
            Self::Del(_) => "del",
            Self::Check(_) => "check",
            Self::Status => "status",
        }
    }
}

// === impl Response ===

impl Response {
    /// The result's name, for logs and metric labels: the refusal's reason,
    /// or what was done.
    pub const fn result(&self) -> &'static str {
        match self {
            Self::Enforced { .. } => "enforced",
            Self::HeldClosed { .. } => "held_closed",
            Self::Removed { .. } => "removed",
            Self::Ready => "ready",
            Self::Refused { reason, .. } => reason.as_str(),
        }
    }

    pub fn refused(reason: Refusal, message: impl Into<String>) -> Self {
        Self::Refused { reason, message: message.into() }
    }
}

// === impl Refusal ===

impl Refusal {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::NoDatapath => "no_datapath",
            Self::DatapathLoading => "datapath_loading",
            Self::ConflictingEndpoint => "conflicting_endpoint",
            Self::NotEnforced => "not_enforced",
            Self::UnknownPod => "unknown_pod",
            Self::Io => "io",
        }
    }

    /// The CNI error code the plugin reports it with.
    pub const fn cni_code(self) -> u32 {
        match self {
            Self::DatapathLoading => code::TRY_AGAIN_LATER,
            Self::NoDatapath => code::NO_DATAPATH,
            Self::InvalidRequest => code::AGENT_REFUSED,
            Self::ConflictingEndpoint | Self::NotEnforced | Self::UnknownPod | Self::Io => code::NOT_ENFORCED,
        }
    }
}

/// A Kubernetes namespace or pod name (DNS label or subdomain): lowercase
/// letters, digits, `-` and `.`, starting and ending with a letter or digit.
/// Never `_` (the file name's separator) or `/` (a path).
pub fn validate_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(format!("{what} {s:?} is not a Kubernetes name (lowercase letters, digits, '-', '.')")) }
}

/// Sends `request` to the agent on `socket` and reads its answer, each way
/// within `timeout`.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    let unreachable = |e: std::io::Error| CallError::Unreachable(format!("{}: {e}", socket.display()));
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let mut line = serde_json::to_vec(request).map_err(|e| CallError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(unreachable)?;
    let mut answer = Vec::new();
    match stream.take(MAX_MESSAGE_BYTES as u64 + 1).read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(CallError::Unreachable(format!("{}: no answer within {timeout:?}", socket.display())));
        }
        Err(e) => return Err(unreachable(e)),
    }
    if answer.len() > MAX_MESSAGE_BYTES {
        return Err(CallError::Protocol(format!("the answer is longer than {MAX_MESSAGE_BYTES} bytes")));
    }
    if answer.is_empty() {
        return Err(CallError::Unreachable(format!("{}: the connection closed without an answer", socket.display())));
    }
    serde_json::from_slice(&answer).map_err(|e| CallError::Protocol(format!("cannot decode the answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add() -> Request {
        Request::Add(AddPod {
            container_id: "0f3a".into(),
            endpoint: LocalEndpoint {
                namespace: "shop".into(),
                name: "web".into(),
                interface: "veth1".into(),
                mac: "02:00:00:00:00:01".into(),
                ips: vec!["10.244.1.7".parse().unwrap()],
            },
        })
    }

    #[test]
    fn requests_and_responses_round_trip_and_read_as_documented() {
        let text = serde_json::to_string(&add()).unwrap();
        assert!(text.starts_with(r#"{"command":"ADD","containerId":"0f3a","endpoint":{"namespace":"shop""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), add());
        let status: Request = serde_json::from_str(r#"{"command":"STATUS"}"#).unwrap();
        assert_eq!(status, Request::Status);
        let r = Response::refused(Refusal::NotEnforced, "attach failed");
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"result":"refused","reason":"not_enforced","message":"attach failed"}"#);
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
    }

    #[test]
    fn unknown_commands_and_fields_are_refused() {
        for bad in [
            r#"{"command":"ADD","containerId":"x","endpoint":{"namespace":"a","name":"b","interface":"c","mac":"m","ips":[]},"extra":1}"#,
            r#"{"command":"DEL","containerId":"x","namespace":"a"}"#,
            r#"{"command":"RESET"}"#,
            r#"{"containerId":"x"}"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_kubernetes_names_can_become_file_names() {
        for ok in ["shop", "web-7d4b9c-x2x", "a", "kube-system", "my.pod.1"] {
            validate_name("pod", ok).unwrap();
        }
        for bad in ["", "Shop", "a_b", "../etc", "a/b", "-a", "a.", ".", "..", &"a".repeat(254)] {
            assert!(validate_name("pod", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_absent_agent_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(&dir.path().join("cni.sock"), &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, CallError::Unreachable(_)), "{err:?}");
    }

    #[test]
    fn a_silent_agent_is_unreachable_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let silent = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(s);
        });
        let start = std::time::Instant::now();
        let err = call(&path, &Request::Status, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(&err, CallError::Unreachable(m) if m.contains("no answer")), "{err:?}");
        assert!(start.elapsed() < Duration::from_millis(450));
        silent.join().unwrap();
    }
}
