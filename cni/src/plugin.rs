//! The plugin's commands: each turns the invocation into one call to the
//! node agent and the agent's answer into the spec's output.
//!
//! Failure semantics: ADD fails unless the agent answers that it enforces
//! the pod's interface (or holds it closed until the view names the pod);
//! DEL succeeds whenever nothing is left behind, also without the agent
//! (the plugin then removes the endpoint file itself); CHECK fails unless
//! the agent still enforces the pod.

use std::path::Path;

use meshguard_common::cluster::LocalEndpoint;

use crate::env::{Command, Invocation, PodName};
use crate::protocol::{self, AddPod, CallError, CheckPod, DelPod, Request, Response};
use crate::spec::{self, CniError, NetConf, Settings, code};

/// What the binary prints and exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit: u8,
}

/// Runs one invocation: the environment through `var`, the configuration
/// from `stdin`.
pub fn run(var: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let inv = match Invocation::from_vars(var) {
        Ok(inv) => inv,
        Err(e) => return failure(&spec::version_hint(stdin), &e),
    };
    if inv.command == Command::Version {
        return Outcome { stdout: spec::version_result(stdin), exit: 0 };
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return failure(&spec::version_hint(stdin), &e),
    };
    let done = conf.settings().and_then(|s| match inv.command {
        Command::Add => add(&inv, &conf, &s).map(Some),
        Command::Del => del(&inv, &conf, &s).map(|()| None),
        Command::Check => check(&inv, &conf, &s).map(|()| None),
        Command::Status => status(&s).map(|()| None),
        // DEL removes a pod's state; the runtime DELs every attachment it
        // drops before it asks for GC, so there is nothing left to collect.
        Command::Gc => Ok(None),
        Command::Version => unreachable!("answered above"),
    });
    match done {
        Ok(out) => Outcome { stdout: out.unwrap_or_default(), exit: 0 },
        Err(e) => failure(&conf.cni_version, &e),
    }
}

fn failure(version: &str, e: &CniError) -> Outcome {
    Outcome { stdout: e.to_json(version), exit: 1 }
}

fn add(inv: &Invocation, conf: &NetConf, s: &Settings) -> Result<String, CniError> {
    inv.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    let pod = inv.pod()?;
    let prev = conf.prev_result()?;
    let net = spec::pod_network(prev, inv.ifname(), &spec::sysfs_is_bridge)?;
    let request = Request::Add(AddPod {
        container_id: inv.container_id().to_owned(),
        endpoint: LocalEndpoint { namespace: pod.namespace, name: pod.name, interface: net.host_interface, mac: net.mac, ips: net.ips },
    });
    match ask(s, &request)? {
        Response::Enforced { .. } | Response::HeldClosed { .. } => Ok(spec::add_result(prev, &conf.cni_version)),
        other => Err(unexpected(other)),
    }
}

fn del(inv: &Invocation, conf: &NetConf, s: &Settings) -> Result<(), CniError> {
    // Without a pod name ADD refused, so nothing was handed over.
    let Ok(pod) = inv.pod() else { return Ok(()) };
    if protocol::validate_name("namespace", &pod.namespace).is_err() || protocol::validate_name("pod", &pod.name).is_err() {
        return Ok(());
    }
    // The interface ADD handed over, when the cached result still says.
    let interface = conf
        .prev_result
        .as_ref()
        .and_then(|prev| spec::pod_network(prev, inv.ifname(), &spec::sysfs_is_bridge).ok())
        .map(|n| n.host_interface);
    let request = Request::Del(DelPod {
        container_id: inv.container_id().to_owned(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        interface: interface.clone(),
    });
    match protocol::call(&s.agent_socket, &request, s.timeout) {
        Ok(Response::Removed { .. }) => Ok(()),
        Ok(other) => Err(unexpected(other)),
        // The agent re-reads its directory when it starts: removing the
        // file is the whole of DEL while it is down.
        Err(CallError::Unreachable(_)) => remove_endpoint_file(&s.endpoints_dir, &pod, interface.as_deref()),
        Err(CallError::Protocol(e)) => {
            Err(CniError::new(code::AGENT_REFUSED, "the node agent's answer is not meshguard's hand-off protocol", e))
        }
    }
}

fn check(inv: &Invocation, conf: &NetConf, s: &Settings) -> Result<(), CniError> {
    inv.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    let pod = inv.pod()?;
    let net = spec::pod_network(conf.prev_result()?, inv.ifname(), &spec::sysfs_is_bridge)?;
    let request = Request::Check(CheckPod {
        container_id: inv.container_id().to_owned(),
        namespace: pod.namespace,
        name: pod.name,
        interface: net.host_interface,
    });
    match ask(s, &request)? {
        Response::Enforced { .. } | Response::HeldClosed { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn status(s: &Settings) -> Result<(), CniError> {
    match ask(s, &Request::Status) {
        Ok(Response::Ready) => Ok(()),
        Ok(other) => Err(CniError::new(code::NOT_AVAILABLE, "the node agent cannot enforce new pods now", unexpected(other).msg)),
        Err(e) => Err(CniError::new(code::NOT_AVAILABLE, e.msg, e.details)),
    }
}

/// One call to the agent; a refusal or no answer is an error.
fn ask(s: &Settings, request: &Request) -> Result<Response, CniError> {
    match protocol::call(&s.agent_socket, request, s.timeout) {
        Ok(Response::Refused { reason, message }) => {
            Err(CniError::new(reason.cni_code(), format!("the node agent refused the pod ({})", reason.as_str()), message))
        }
        Ok(r) => Ok(r),
        Err(CallError::Unreachable(e)) => {
            Err(CniError::new(code::AGENT_UNREACHABLE, "the meshguard node agent does not answer; a pod is not started unenforced", e))
        }
        Err(CallError::Protocol(e)) => {
            Err(CniError::new(code::AGENT_REFUSED, "the node agent's answer is not meshguard's hand-off protocol", e))
        }
    }
}

fn unexpected(r: Response) -> CniError {
    match r {
        Response::Refused { reason, message } => {
            CniError::new(reason.cni_code(), format!("the node agent refused ({})", reason.as_str()), message)
        }
        other => CniError::new(code::AGENT_REFUSED, format!("the node agent answered {:?} to this command", other.result()), ""),
    }
}

/// DEL without the agent: removes `<dir>/<namespace>_<name>.yaml` unless it
/// names another interface than `interface` (a newer sandbox's).
fn remove_endpoint_file(dir: &Path, pod: &PodName, interface: Option<&str>) -> Result<(), CniError> {
    let path = dir.join(format!("{}_{}.yaml", pod.namespace, pod.name));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CniError::new(code::IO_FAILURE, format!("cannot read {}", path.display()), e.to_string())),
    };
    if let (Some(want), Ok(ep)) = (interface, meshguard_common::yaml::from_str::<LocalEndpoint>(&text))
        && ep.interface != want
    {
        return Ok(());
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::new(code::IO_FAILURE, format!("cannot remove {}", path.display()), e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| map.get(k).cloned()
    }

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth9"},{"name":"eth0","mac":"02:00:00:00:00:09","sandbox":"/run/netns/p"}],"ips":[{"interface":1,"address":"10.244.1.9/24"}]}"#;

    fn conf(dir: &Path, prev: bool) -> String {
        let prev = if prev { format!(r#","prevResult":{PREV}"#) } else { String::new() };
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"meshguard-cni","agentSocket":"{}/cni.sock","endpointsDir":"{}","timeout":"1s"{prev}}}"#,
            dir.display(),
            dir.display()
        )
    }

    const POD: &[(&str, &str)] = &[
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/run/netns/p"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
    ];

    fn invoke(command: &str, stdin: &str) -> (u32, serde_json::Value) {
        let mut vars = POD.to_vec();
        vars.push(("CNI_COMMAND", command));
        let out = run(&env(&vars), stdin.as_bytes());
        assert_eq!(out.exit, 1, "{}", out.stdout);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        (v["code"].as_u64().unwrap() as u32, v)
    }

    #[test]
    fn add_without_an_agent_fails_with_the_error_object_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (code, v) = invoke("ADD", &conf(dir.path(), true));
        assert_eq!(code, code::AGENT_UNREACHABLE);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["details"].as_str().unwrap().contains("cni.sock"), "{v}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bad_input_is_refused_before_the_agent_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(invoke("ADD", &conf(dir.path(), false)).0, code::INVALID_CONFIG, "no prevResult");
        assert_eq!(invoke("ADD", "{").0, code::DECODE_FAILURE);
        let out = run(&env(&[("CNI_COMMAND", "ADD")]), conf(dir.path(), true).as_bytes());
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!((out.exit, v["code"].as_u64()), (1, Some(u64::from(code::INVALID_ENVIRONMENT))));
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME"), "{v}");
    }

    #[test]
    fn del_without_an_agent_removes_the_file_unless_a_newer_sandbox_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shop_web.yaml");
        let ep = |iface: &str| LocalEndpoint {
            namespace: "shop".into(),
            name: "web".into(),
            interface: iface.into(),
            mac: "02:00:00:00:00:09".into(),
            ips: vec!["10.244.1.9".parse().unwrap()],
        };
        let mut vars = POD.to_vec();
        vars.push(("CNI_COMMAND", "DEL"));
        std::fs::write(&file, meshguard_common::yaml::to_string(&ep("veth-newer")).unwrap()).unwrap();
        assert_eq!(run(&env(&vars), conf(dir.path(), true).as_bytes()).exit, 0);
        assert!(file.exists(), "another interface's file must stay");
        std::fs::write(&file, meshguard_common::yaml::to_string(&ep("veth9")).unwrap()).unwrap();
        assert_eq!(run(&env(&vars), conf(dir.path(), true).as_bytes()), Outcome { stdout: String::new(), exit: 0 });
        assert!(!file.exists());
        // Again, and without prevResult or a pod name: still a success.
        assert_eq!(run(&env(&vars), conf(dir.path(), false).as_bytes()).exit, 0);
        assert_eq!(run(&env(&[("CNI_COMMAND", "DEL")]), conf(dir.path(), false).as_bytes()).exit, 0);
    }

    #[test]
    fn version_needs_no_configuration_and_status_fails_without_an_agent() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), br#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(out.exit, 0);
        assert!(out.stdout.contains(r#""supportedVersions":["0.4.0","1.0.0","1.1.0"]"#), "{}", out.stdout);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(invoke("STATUS", &conf(dir.path(), false)).0, code::NOT_AVAILABLE);
        let out = run(&env(&[("CNI_COMMAND", "GC")]), conf(dir.path(), false).as_bytes());
        assert_eq!(out, Outcome { stdout: String::new(), exit: 0 });
    }
}
