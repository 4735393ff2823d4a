//! The CNI specification's side of the plugin
//! (<https://www.cni.dev/docs/spec/>, versions 0.4.0, 1.0.0 and 1.1.0): the
//! network configuration on stdin, the main plugin's result in `prevResult`,
//! and the error object. Pure: parsed from bytes and tested without a runtime.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::protocol::DEFAULT_AGENT_SOCKET;

/// The spec versions this plugin speaks; 0.4.0 is the first that passes
/// `prevResult` on DEL and has CHECK, both of which the plugin relies on.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

/// Where the agent keeps its endpoint files when `endpointsDir` is not given:
/// the path the agent's documentation uses. Only read on DEL while the agent
/// does not answer.
pub const DEFAULT_ENDPOINTS_DIR: &str = "/var/lib/meshguard/endpoints";
/// How long the agent may take to enforce a pod: attaching is milliseconds,
/// but a busy node's agent may be mid-sync.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Error codes: 1-99 are the spec's well-known codes, 100 and up this plugin's.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS (1.1.0): the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// The node agent does not answer on its socket.
    pub const AGENT_UNREACHABLE: u32 = 100;
    /// The agent cannot enforce the pod (attach failed, conflicting endpoint, ...).
    pub const NOT_ENFORCED: u32 = 101;
    /// The agent runs without a policy datapath: it enforces no pod.
    pub const NO_DATAPATH: u32 = 102;
    /// The agent refused the request as malformed, or answered nonsense.
    pub const AGENT_REFUSED: u32 = 103;
}

/// A failure, printed as the spec's error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// The plugin's part of the network configuration; every other key (`name`,
/// `runtimeConfig`, `args`, ...) is the runtime's and is ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The node agent's hand-off socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// The agent's endpoints directory, for DEL while the agent is down.
    #[serde(default)]
    pub endpoints_dir: Option<PathBuf>,
    /// How long to wait for the agent (a duration: `10s`, `500ms`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// The validated plugin settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub agent_socket: PathBuf,
    pub endpoints_dir: PathBuf,
    pub timeout: Duration,
}

/// What the main plugin set up for the pod, as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The host-side end of the pod's veth.
    pub host_interface: String,
    /// The pod's MAC (its interface named `CNI_IFNAME` in the sandbox).
    pub mac: String,
    pub ips: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<ResultInterface>,
    #[serde(default)]
    ips: Vec<ResultIp>,
}

#[derive(Deserialize)]
struct ResultInterface {
    name: String,
    #[serde(default)]
    mac: String,
    /// Empty or absent: a host interface.
    #[serde(default)]
    sandbox: String,
}

/// 0.4.0 adds `version`, 1.0.0 drops it; both are read the same way.
#[derive(Deserialize)]
struct ResultIp {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

// === impl CniError ===

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }

    fn config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg, "")
    }

    /// The spec's error object, for stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut v = serde_json::json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v.to_string()
    }
}

// === impl NetConf ===

impl NetConf {
    /// Parses stdin; a version outside [`SUPPORTED_VERSIONS`] is refused.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(code::DECODE_FAILURE, "cannot decode the network configuration on stdin", e.to_string()))?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("meshguard-cni does not support CNI version {:?}", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    pub fn settings(&self) -> Result<Settings, CniError> {
        let absolute = |key: &str, p: Option<&PathBuf>, default: &str| match p {
            Some(p) if !p.is_absolute() => Err(CniError::config(format!("{key} {:?} must be an absolute path", p.display()))),
            Some(p) => Ok(p.clone()),
            None => Ok(PathBuf::from(default)),
        };
        let timeout = match &self.timeout {
            Some(t) => meshguard_common::config::parse_duration(t).map_err(|e| CniError::config(format!("timeout {t:?}: {e}")))?,
            None => DEFAULT_TIMEOUT,
        };
        Ok(Settings {
            agent_socket: absolute("agentSocket", self.agent_socket.as_ref(), DEFAULT_AGENT_SOCKET)?,
            endpoints_dir: absolute("endpointsDir", self.endpoints_dir.as_ref(), DEFAULT_ENDPOINTS_DIR)?,
            timeout,
        })
    }

    /// `prevResult`, required: a chained plugin has nothing to work on without it.
    pub fn prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            CniError::config(
                "no prevResult: meshguard-cni is a chained plugin and must follow a main plugin (ptp, bridge, ...) in a network configuration list",
            )
        })
    }
}

/// The `cniVersion` of whatever stdin holds, for an error about it; the
/// latest version when there is none.
pub fn version_hint(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_owned())
}

/// VERSION's answer, in the version the caller asked in (when supported).
pub fn version_result(stdin: &[u8]) -> String {
    serde_json::json!({"cniVersion": version_hint(stdin), "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// ADD's result: `prevResult` unchanged, as a chained plugin that sets up
/// nothing the result describes must return it.
pub fn add_result(prev: &Value, cni_version: &str) -> String {
    let mut out = prev.clone();
    if let Some(obj) = out.as_object_mut() {
        obj.entry("cniVersion").or_insert_with(|| Value::String(cni_version.to_owned()));
    }
    out.to_string()
}

/// Finds the pod's host-side interface, MAC and addresses in the main
/// plugin's result. `is_bridge` tells a bridge from a veth when several host
/// interfaces are listed (the bridge plugin lists its bridge too).
pub fn pod_network(prev: &Value, ifname: &str, is_bridge: &dyn Fn(&str) -> bool) -> Result<PodNetwork, CniError> {
    let result: PrevResult =
        serde_json::from_value(prev.clone()).map_err(|e| CniError::config(format!("prevResult is not a CNI result: {e}")))?;
    let mut hosts: Vec<&str> =
        result.interfaces.iter().filter(|i| i.sandbox.is_empty() && !i.name.is_empty()).map(|i| i.name.as_str()).collect();
    if hosts.len() > 1 {
        hosts.retain(|h| !is_bridge(h));
    }
    let host = match hosts.as_slice() {
        [one] => (*one).to_owned(),
        [] => {
            return Err(CniError::config(
                "prevResult lists no host-side interface (one without `sandbox`): meshguard enforces on the host end of the pod's veth, as ptp and bridge create it",
            ));
        }
        many => {
            return Err(CniError::config(format!(
                "prevResult lists several host-side interfaces ({}); cannot tell the pod's veth",
                many.join(", ")
            )));
        }
    };
    let sandboxed = result.interfaces.iter().filter(|i| !i.sandbox.is_empty()).count();
    let (index, pod) = result
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| !i.sandbox.is_empty() && i.name == ifname)
        .ok_or_else(|| CniError::config(format!("prevResult lists no interface {ifname:?} in the pod's sandbox (CNI_IFNAME)")))?;
    if pod.mac.is_empty() {
        return Err(CniError::config(format!("prevResult gives no MAC for the pod's {ifname}; anti-spoofing needs it")));
    }
    let mut ips = Vec::new();
    for ip in &result.ips {
        let ours = match ip.interface {
            Some(i) => i == index,
            // No index: only unambiguous with one sandbox interface.
            None => sandboxed == 1,
        };
        if !ours {
            continue;
        }
        let addr = ip.address.split_once('/').map_or(ip.address.as_str(), |(a, _)| a);
        let addr: IpAddr = addr.parse().map_err(|_| CniError::config(format!("prevResult has an invalid address {:?}", ip.address)))?;
        if !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    if ips.is_empty() {
        return Err(CniError::config(format!("prevResult gives the pod's {ifname} no IP address")));
    }
    Ok(PodNetwork { host_interface: host, mac: pod.mac.to_ascii_lowercase(), ips })
}

/// Whether the host interface `name` is a bridge (sysfs, in the runtime's
/// network namespace, where the plugin runs).
pub fn sysfs_is_bridge(name: &str) -> bool {
    !name.contains('/') && Path::new("/sys/class/net").join(name).join("bridge").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &str) -> bool {
        false
    }

    /// ptp's result as 0.4.0 writes it (`version` on each address).
    const PTP_040: &str = r#"{"cniVersion":"0.4.0",
        "interfaces":[{"name":"veth1a2b3c4d","mac":"6e:01:02:03:04:05"},
                      {"name":"eth0","mac":"AA:BB:CC:00:11:22","sandbox":"/var/run/netns/cni-1234"}],
        "ips":[{"version":"4","interface":1,"address":"10.244.1.7/24","gateway":"10.244.1.1"},
               {"version":"6","interface":1,"address":"fd00::7/64"}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    /// The bridge plugin as 1.0.0 writes it: the bridge is a host interface too.
    const BRIDGE_100: &str = r#"{"cniVersion":"1.0.0",
        "interfaces":[{"name":"cni0","mac":"7e:00:00:00:00:01"},
                      {"name":"vethabcd","mac":"7e:00:00:00:00:02"},
                      {"name":"eth0","mac":"02:00:00:00:00:03","sandbox":"/run/netns/x"}],
        "ips":[{"interface":2,"address":"10.88.0.5/16","gateway":"10.88.0.1"}]}"#;

    fn value(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn ptp_040_gives_the_host_veth_the_pod_mac_and_both_addresses() {
        let net = pod_network(&value(PTP_040), "eth0", &never).unwrap();
        assert_eq!(net.host_interface, "veth1a2b3c4d");
        assert_eq!(net.mac, "aa:bb:cc:00:11:22");
        assert_eq!(net.ips, vec!["10.244.1.7".parse::<IpAddr>().unwrap(), "fd00::7".parse().unwrap()]);
    }

    #[test]
    fn bridge_100_skips_the_bridge() {
        let net = pod_network(&value(BRIDGE_100), "eth0", &|n| n == "cni0").unwrap();
        assert_eq!(net.host_interface, "vethabcd");
        assert_eq!(net.ips, vec!["10.88.0.5".parse::<IpAddr>().unwrap()]);
        // Without telling bridges apart, two host interfaces are ambiguous.
        let err = pod_network(&value(BRIDGE_100), "eth0", &never).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("cni0, vethabcd"), "{}", err.msg);
    }

    #[test]
    fn addresses_of_other_interfaces_are_not_the_pods() {
        let prev = value(
            r#"{"interfaces":[{"name":"h"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/n"},{"name":"net1","mac":"02:00:00:00:00:02","sandbox":"/n"}],
                "ips":[{"interface":2,"address":"192.168.9.9/24"},{"interface":1,"address":"10.1.1.1/32"},{"address":"10.9.9.9/32"}]}"#,
        );
        let net = pod_network(&prev, "eth0", &never).unwrap();
        assert_eq!(
            net.ips,
            vec!["10.1.1.1".parse::<IpAddr>().unwrap()],
            "an address without an index is ambiguous with two sandbox interfaces"
        );
    }

    #[test]
    fn what_the_agent_needs_must_be_there() {
        let cases = [
            (
                r#"{"interfaces":[{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/n"}],"ips":[{"interface":0,"address":"10.0.0.1/32"}]}"#,
                "no host-side interface",
            ),
            (r#"{"interfaces":[{"name":"h"},{"name":"eth1","mac":"02:00:00:00:00:01","sandbox":"/n"}],"ips":[]}"#, "no interface \"eth0\""),
            (r#"{"interfaces":[{"name":"h"},{"name":"eth0","sandbox":"/n"}],"ips":[{"interface":1,"address":"10.0.0.1/32"}]}"#, "no MAC"),
            (r#"{"interfaces":[{"name":"h"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/n"}],"ips":[]}"#, "no IP address"),
            (
                r#"{"interfaces":[{"name":"h"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/n"}],"ips":[{"interface":1,"address":"ten/8"}]}"#,
                "invalid address",
            ),
            (r#"{"interfaces":"none"}"#, "not a CNI result"),
        ];
        for (prev, want) in cases {
            let err = pod_network(&value(prev), "eth0", &never).unwrap_err();
            assert_eq!(err.code, code::INVALID_CONFIG);
            assert!(err.msg.contains(want), "{want:?} not in {:?}", err.msg);
        }
    }

    #[test]
    fn the_configuration_is_checked_before_anything_is_done() {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"meshguard-cni","runtimeConfig":{}}"#).unwrap();
        let s = conf.settings().unwrap();
        assert_eq!(s.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(s.endpoints_dir, PathBuf::from(DEFAULT_ENDPOINTS_DIR));
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert_eq!(conf.prev_result().unwrap_err().code, code::INVALID_CONFIG);
        let conf = NetConf::parse(br#"{"cniVersion":"1.1.0","agentSocket":"/s","endpointsDir":"/e","timeout":"250ms","prevResult":null}"#)
            .unwrap();
        assert_eq!(
            conf.settings().unwrap(),
            Settings { agent_socket: "/s".into(), endpoints_dir: "/e".into(), timeout: Duration::from_millis(250) }
        );
        assert!(conf.prev_result.is_none());

        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE_FAILURE);
        assert_eq!(NetConf::parse(br#"{"name":"x"}"#).unwrap_err().code, code::DECODE_FAILURE);
        assert_eq!(NetConf::parse(br#"{"cniVersion":"0.3.1"}"#).unwrap_err().code, code::INCOMPATIBLE_VERSION);
        for bad in [r#""agentSocket":"run/cni.sock""#, r#""endpointsDir":"e""#, r#""timeout":"10""#, r#""timeout":"0s""#] {
            let conf = NetConf::parse(format!(r#"{{"cniVersion":"1.0.0",{bad}}}"#).as_bytes()).unwrap();
            assert_eq!(conf.settings().unwrap_err().code, code::INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn the_error_object_is_the_specs() {
        let e = CniError::new(code::AGENT_UNREACHABLE, "agent down", "connect: ENOENT");
        let v: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v, serde_json::json!({"cniVersion":"1.0.0","code":100,"msg":"agent down","details":"connect: ENOENT"}));
        let v: Value = serde_json::from_str(&CniError::new(7, "m", "").to_json("0.4.0")).unwrap();
        assert!(v.get("details").is_none());
    }

    #[test]
    fn version_answers_in_the_callers_version_and_add_returns_prev_result_unchanged() {
        let v: Value = serde_json::from_str(&version_result(br#"{"cniVersion":"0.4.0"}"#)).unwrap();
        assert_eq!(v, serde_json::json!({"cniVersion":"0.4.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}));
        let v: Value = serde_json::from_str(&version_result(b"")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        let prev = value(PTP_040);
        assert_eq!(value(&add_result(&prev, "1.0.0")), prev, "a version already there is kept");
        let bare = value(r#"{"interfaces":[],"ips":[]}"#);
        assert_eq!(value(&add_result(&bare, "1.0.0"))["cniVersion"], "1.0.0");
    }
}
