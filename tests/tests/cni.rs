//! `meshguard-cni` as a container runtime runs it (root only; fails without
//! root): Debian's real `ptp` main plugin with `host-local` IPAM, then
//! `meshguard-cni` with ptp's result as `prevResult`, for ADD; DEL in
//! reverse order; CHECK with the cached result. The plugins run in the
//! simulated node's network namespace, as a runtime runs them on its host;
//! the pod is a network namespace the test creates.
//!
//! ADD returns only once the node agent has the pod's host-side veth under
//! enforcement, and fails — error object, non-zero exit, no endpoint file,
//! nothing attached — when it cannot be.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshguard_common::cluster::LocalEndpoint;
use meshguard_ebpf::PinLayout;
use meshguard_ebpf::abi::{PROG_FROM_POD, PROG_TO_POD};
use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::cluster::{Cluster, Pod, cluster, wait_until};
use meshguard_meshctl::sim::cmd::{ip, ip_in};
use serde_json::{Value, json};

/// Where Debian's containernetworking-plugins installs them.
const CNI_PLUGINS: &str = "/usr/lib/cni";
const ECHO_PORT: u16 = 7000;
const NODE: &str = "node-1";

/// db admits only service account `web`, on TCP 7000.
const POLICY: &str = "
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: db-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}]
";

/// One plugin run: what it printed and how long it took.
#[derive(Debug)]
struct Call {
    plugin: String,
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// A pod sandbox and the network configuration list a runtime would hold
/// for it: ptp (host-local IPAM) then meshguard-cni.
struct Sandbox {
    namespace: String,
    name: String,
    node_netns: String,
    netns: String,
    container_id: String,
    conflist: Value,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{} printed no JSON ({e}): {:?} {:?}", self.plugin, self.stdout, self.stderr))
    }

    /// The error object's code, checking the object is the spec's.
    fn error_code(&self) -> u64 {
        assert!(!self.ok, "{} succeeded: {}", self.plugin, self.stdout);
        let v = self.json();
        assert!(v["cniVersion"].is_string() && v["msg"].is_string(), "not a CNI error object: {v}");
        v["code"].as_u64().unwrap_or_else(|| panic!("no code in {v}"))
    }
}

impl Sandbox {
    /// Creates the pod's network namespace and registers the pod with the
    /// cluster (which removes the namespace with everything else), not yet
    /// in the view: the cluster file is written again only when the test says.
    fn new(c: &mut Cluster, pod: &str) -> Self {
        assert!(
            Path::new(CNI_PLUGINS).join("ptp").is_file(),
            "{CNI_PLUGINS}/ptp is missing: install Debian's containernetworking-plugins (./scripts/setup.sh)"
        );
        let (namespace, name) = pod.split_once('/').unwrap();
        let netns = format!("{}-{namespace}_{name}", c.run_id);
        c.pods.push(Pod {
            namespace: namespace.into(),
            name: name.into(),
            node: NODE.into(),
            service_account: name.into(),
            labels: Default::default(),
            netns: netns.clone(),
            ip: std::net::Ipv4Addr::UNSPECIFIED,
            host_if: String::new(),
            mac: String::new(),
        });
        ip(&["netns", "add", &netns]).unwrap();
        ip_in(&netns, &["link", "set", "lo", "up"]).unwrap();
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "meshguard-test",
            "plugins": [
                {
                    "type": "ptp",
                    "mtu": 1420,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.100", "rangeEnd": "10.244.1.150"}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": c.dir.join("cni-ipam"),
                    }
                },
                {
                    "type": "meshguard-cni",
                    "agentSocket": c.cni_socket(NODE),
                    "endpointsDir": c.endpoints_dir(NODE),
                    "timeout": "10s"
                }
            ]
        });
        Sandbox {
            namespace: namespace.into(),
            name: name.into(),
            node_netns: c.node(NODE).netns.clone(),
            netns,
            container_id: format!("{:064x}", rand::random::<u128>()),
            conflist,
        }
    }

    /// Runs plugin `i` of the list as libcni does: its object plus the
    /// list's `cniVersion` and `name`, and `prevResult` when given, on
    /// stdin; the `CNI_*` variables in an otherwise empty environment.
    fn invoke(&self, i: usize, command: &str, prev: Option<&Value>) -> Call {
        let mut conf = self.conflist["plugins"][i].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let plugin = conf["type"].as_str().unwrap().to_owned();
        let path = if plugin == "meshguard-cni" { bin_path("meshguard-cni") } else { Path::new(CNI_PLUGINS).join(&plugin) };
        let cni_path = format!("{CNI_PLUGINS}:{}", path.parent().unwrap().display());
        let started = Instant::now();
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg("--")
            .arg(&path)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", format!("/run/netns/{}", self.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", self.cni_args())
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        Call {
            plugin,
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    }

    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.namespace, self.name, self.container_id
        )
    }

    /// ADD down the list, each plugin given the previous one's result;
    /// stops at the first failure, as libcni does.
    fn add(&self) -> Vec<Call> {
        let mut calls: Vec<Call> = Vec::new();
        for i in 0..2 {
            let prev = calls.last().map(Call::json);
            let call = self.invoke(i, "ADD", prev.as_ref());
            let failed = !call.ok;
            calls.push(call);
            if failed {
                break;
            }
        }
        calls
    }

    /// DEL up the list with the cached result (the list's final ADD result).
    fn del(&self, cached: Option<&Value>) -> Vec<Call> {
        (0..2).rev().map(|i| self.invoke(i, "DEL", cached)).collect()
    }

    fn check(&self, cached: &Value) -> Call {
        self.invoke(1, "CHECK", Some(cached))
    }
}

/// The host-side veth's name and index in the node's namespace, from ptp's result.
fn host_veth(c: &Cluster, result: &Value) -> (String, u32) {
    let name =
        result["interfaces"].as_array().unwrap().iter().find(|i| i.get("sandbox").is_none()).unwrap()["name"].as_str().unwrap().to_owned();
    let link: Value = serde_json::from_str(&ip_in(&c.node(NODE).netns, &["-j", "link", "show", &name]).unwrap()).unwrap();
    (name, link[0]["ifindex"].as_u64().unwrap() as u32)
}

fn programs_attached(c: &Cluster, ifindex: u32) -> bool {
    let pin = PinLayout::new(c.pin_dir(NODE));
    [PROG_FROM_POD, PROG_TO_POD].iter().any(|p| pin.link(ifindex, p).exists())
}

fn endpoint_file(c: &Cluster, pod: &str) -> PathBuf {
    c.endpoints_dir(NODE).join(format!("{}.yaml", pod.replace('/', "_")))
}

fn metric(c: &Cluster, series: &str) -> f64 {
    c.metric(NODE, series).unwrap_or(0.0)
}

#[test]
fn root_cni_add_enforces_the_pod_before_it_returns_and_del_takes_it_away() {
    let mut c = cluster().nodes(1).pod("shop/db").label("app", "db").on(NODE).policy(POLICY).build().unwrap();
    c.start_agents().unwrap();
    c.start_echo("shop/db", ECHO_PORT).unwrap();
    let db = format!("{}:{ECHO_PORT}", c.pod("shop/db").ip);
    let sandbox = Sandbox::new(&mut c, "shop/web");

    let calls = sandbox.add();
    let [ptp, mg] = calls.as_slice() else { panic!("ADD stopped early: {calls:#?}") };
    assert!(ptp.ok && mg.ok, "{calls:#?}");
    let result = mg.json();
    assert_eq!(result, ptp.json(), "a chained plugin returns prevResult unchanged");
    eprintln!("ADD: ptp {:?}, meshguard-cni {:?} (agent sync included)", ptp.took, mg.took);
    assert!(mg.took < Duration::from_secs(5), "ADD took {:?}", mg.took);

    // When ADD returned, the veth was already closed: the agent wrote the
    // pod's endpoint file and attached the programs, and the view does not
    // name the pod yet.
    let (veth, ifindex) = host_veth(&c, &result);
    assert!(programs_attached(&c, ifindex), "ADD returned before {veth} had its programs");
    let ep: LocalEndpoint = meshguard_common::yaml::from_str(&std::fs::read_to_string(endpoint_file(&c, "shop/web")).unwrap()).unwrap();
    let pod_link: Value = serde_json::from_str(&ip_in(&sandbox.netns, &["-j", "link", "show", "eth0"]).unwrap()).unwrap();
    assert_eq!((ep.interface.as_str(), ep.mac.as_str()), (veth.as_str(), pod_link[0]["address"].as_str().unwrap()));
    let web_ip = ep.ips[0];
    assert_eq!(metric(&c, "meshguard_wg_cni_requests_total{command=\"add\",result=\"held_closed\"}"), 1.0);
    assert_eq!(metric(&c, "meshguard_datapath_pods{state=\"closed\"}"), 1.0);
    assert!(!c.probe("shop/web", &["tcp", &db, "held closed", "--timeout", "2"]), "a pod the view does not name passed traffic");
    let check = sandbox.check(&result);
    assert!(check.ok, "CHECK while held closed: {check:?}");

    // The view names the pod: enforced, and its traffic judged by policy.
    {
        let web = c.pods.last_mut().unwrap();
        let std::net::IpAddr::V4(v4) = web_ip else { panic!("{web_ip}") };
        (web.ip, web.host_if, web.mac) = (v4, veth.clone(), ep.mac.clone());
    }
    c.write_cluster_file().unwrap();
    wait_until("web enforced", Duration::from_secs(15), || metric(&c, "meshguard_datapath_pods{state=\"enforced\"}") == 2.0).unwrap();
    // The pod's ARP for its gateway failed while it was held closed: the
    // kernel retries it on the pod's next packets, as a pod's app retries.
    wait_until("TCP 7000 from web to db (allowed)", Duration::from_secs(15), || {
        c.probe("shop/web", &["tcp", &db, "allowed", "--timeout", "2"])
    })
    .unwrap();
    assert!(!c.probe("shop/web", &["udp", &db, "denied", "--tries", "2"]), "UDP is not in db's policy");
    assert!(metric(&c, "meshguard_datapath_packets_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_default\"}") >= 1.0);
    assert!(sandbox.check(&result).ok, "CHECK once enforced");

    // DEL, meshguard-cni first: the file and the attachment go while the veth is still there.
    let mg_del = sandbox.invoke(1, "DEL", Some(&result));
    assert!(mg_del.ok && mg_del.stdout.is_empty(), "{mg_del:?}");
    assert!(!endpoint_file(&c, "shop/web").exists(), "DEL left the endpoint file");
    assert!(!programs_attached(&c, ifindex), "DEL left {veth}'s programs attached");
    assert_eq!(metric(&c, "meshguard_datapath_pods{state=\"enforced\"}"), 1.0);
    let ptp_del = sandbox.invoke(0, "DEL", Some(&result));
    assert!(ptp_del.ok, "{ptp_del:?}");
    assert_eq!(sandbox.check(&result).error_code(), 101, "CHECK after DEL");
    // DEL again (runtimes retry): still a success.
    assert!(sandbox.del(Some(&result)).iter().all(|c| c.ok));
    assert!(sandbox.del(None).iter().all(|c| c.ok), "DEL without prevResult");
}

#[test]
fn root_cni_add_fails_cleanly_when_no_agent_runs() {
    let mut c = cluster().nodes(1).build().unwrap();
    let sandbox = Sandbox::new(&mut c, "shop/web");
    let calls = sandbox.add();
    let [ptp, mg] = calls.as_slice() else { panic!("{calls:#?}") };
    assert!(ptp.ok, "{ptp:?}");
    assert_eq!(mg.error_code(), 100, "agent unreachable: {}", mg.stdout);
    assert!(mg.json()["details"].as_str().unwrap().contains("cni.sock"), "{}", mg.stdout);
    let (veth, ifindex) = host_veth(&c, &ptp.json());
    assert!(!endpoint_file(&c, "shop/web").exists(), "no endpoint file without an agent");
    assert!(!programs_attached(&c, ifindex), "nothing attached to {veth}");
    let status = sandbox.invoke(1, "STATUS", None);
    assert_eq!(status.error_code(), 50);

    // DEL while the agent is down removes the file an earlier ADD left.
    let dir = c.endpoints_dir(NODE);
    std::fs::create_dir_all(&dir).unwrap();
    let ep = LocalEndpoint { namespace: "shop".into(), name: "web".into(), interface: veth, mac: "02:00:00:00:00:01".into(), ips: vec![] };
    std::fs::write(endpoint_file(&c, "shop/web"), meshguard_common::yaml::to_string(&ep).unwrap()).unwrap();
    let dels = sandbox.del(Some(&ptp.json()));
    assert!(dels.iter().all(|d| d.ok), "{dels:#?}");
    assert!(!endpoint_file(&c, "shop/web").exists(), "DEL without the agent left the endpoint file");
}

#[test]
fn root_cni_add_fails_cleanly_when_the_agent_enforces_no_pod() {
    let mut c = cluster().nodes(1).build().unwrap();
    // The agent, as the cluster runs it, but without a `datapath:` section.
    let config = c.write_agent_config(NODE, true).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let no_datapath: String = text.lines().filter(|l| !l.starts_with("datapath:")).map(|l| format!("{l}\n")).collect();
    let config = config.with_file_name("agent-no-datapath.yaml");
    std::fs::write(&config, no_datapath).unwrap();
    let netns = c.node(NODE).netns.clone();
    c.spawn_in_node(&netns, &bin_path("wg-agent"), &["run", "--config", config.to_str().unwrap()], &[("RUST_LOG", "info")], "agent.log")
        .unwrap();
    let socket = c.cni_socket(NODE);
    wait_until("the agent's CNI socket", Duration::from_secs(20), || std::os::unix::net::UnixStream::connect(&socket).is_ok()).unwrap();

    let sandbox = Sandbox::new(&mut c, "shop/web");
    let calls = sandbox.add();
    let [ptp, mg] = calls.as_slice() else { panic!("{calls:#?}") };
    assert!(ptp.ok, "{ptp:?}");
    assert_eq!(mg.error_code(), 102, "no datapath: {}", mg.stdout);
    let (veth, ifindex) = host_veth(&c, &ptp.json());
    assert!(!endpoint_file(&c, "shop/web").exists());
    assert!(!programs_attached(&c, ifindex), "nothing attached to {veth}");
    assert_eq!(sandbox.invoke(1, "STATUS", None).error_code(), 50);
    let dels = sandbox.del(Some(&ptp.json()));
    assert!(dels.iter().all(|d| d.ok), "{dels:#?}");
    let log = std::fs::read_to_string(c.dir.join("agent.log")).unwrap_or_default();
    assert!(log.contains("CNI request refused") && log.contains("no_datapath"), "the refusal is logged:\n{log}");
}

#[test]
fn version_lists_the_supported_versions() {
    let mut child = Command::new(bin_path("meshguard-cni"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"cniVersion":"1.0.0"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}));
}
