//! The node agent's start-up order and its uninstall (root only; fails
//! without root): before the cluster source answers — identity-ca down after
//! a reboot, bpffs pins gone — the strict blackhole is routed and every local
//! pod interface already drops (issue 14, finding 3); `uninstall` removes
//! routes, pins and the tunnel. Runs the whole agent in a fresh network
//! namespace on a cluster source that never answers.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshguard_common::cluster::{BoxFuture, ClusterSource, ClusterView, LocalEndpoint, NodeRecord, SourceError};
use meshguard_ebpf::PinLayout;
use tokio::sync::watch;

/// identity-ca unreachable: publishing never completes, the view stays empty.
struct Unreachable {
    view: watch::Sender<Arc<ClusterView>>,
}

impl ClusterSource for Unreachable {
    fn publish_node<'a>(&'a self, _node: &'a NodeRecord) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(std::future::pending())
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.subscribe()
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test builds a network namespace, a TUN device and eBPF programs: run it as root");
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pod shop/<name> on host interface `mgs-<name>`, at 10.244.1.<ip>, its
/// MAC ending in the same byte.
fn endpoint(name: &str, ip: u8) -> LocalEndpoint {
    LocalEndpoint {
        namespace: "shop".into(),
        name: name.into(),
        interface: format!("mgs-{name}"),
        mac: format!("02:00:00:00:00:{ip:02x}"),
        ips: vec![Ipv4Addr::new(10, 244, 1, ip).into()],
    }
}

/// Writes `ep`'s file into the endpoints directory, as the CNI plugin would.
fn write_endpoint(dir: &std::path::Path, ep: &LocalEndpoint) {
    std::fs::write(dir.join(ep.file_name()), meshguard_common::yaml::to_string(ep).unwrap()).unwrap();
}

/// In a fresh network namespace (on a thread of its own): a pod veth and
/// its endpoint file, the agent started on an unreachable cluster source;
/// waits up to 30 s (loading the datapath is slow on a busy machine) for the
/// pod's programs and the strict blackhole, then stops the agent and runs
/// `after` (in the namespace). `during` runs while the agent does, in the
/// namespace, given the endpoints directory. Returns (programs, blackhole,
/// during's and after's results).
fn with_agent<D: Send + 'static, T: Send + 'static>(
    name: &'static str,
    pre_enforced: Option<u32>,
    during: impl FnOnce(&std::path::Path, &PinLayout) -> D + Send + 'static,
    after: impl FnOnce(&meshguard_wg_agent::managed::config::AgentConfig, u32) -> T + Send + 'static,
) -> (bool, bool, D, T) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_owned();
    let pin = PinLayout::new(format!("/sys/fs/bpf/meshguard-test/{name}-{}", std::process::id()));
    let _ = pin.remove();
    let pin_root = pin.root().to_owned();
    let outcome = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces; the agent's
        // threads, started from here, inherit the new one.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "add", "mgs-web", "type", "veth", "peer", "name", "mgs-web-pod"]);
        ip(&["link", "set", "mgs-web", "up"]);
        let endpoints = base.join("endpoints");
        std::fs::create_dir_all(&endpoints).unwrap();
        write_endpoint(&endpoints, &endpoint("web", 10));
        let endpoints_dir = endpoints.clone();
        let config = base.join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "nodeName: node-1\nendpoint: 192.168.77.1\npodCidrs: [10.244.1.0/24]\nclusterCidrs: [10.244.0.0/16]\n\
                 interface: mgs0\nstateDir: {b}/state\nuapiSocketDir: {b}/uapi\ncniSocket: {b}/cni.sock\ncluster: {{dir: {b}/unused}}\n\
                 datapath: {{endpointsDir: {e}, pinDir: {p}, eventsSocket: {b}/events.sock}}\n",
                b = base.display(),
                e = endpoints_dir.display(),
                p = pin_root.display(),
            ),
        )
        .unwrap();
        let cfg = meshguard_wg_agent::managed::config::load(&config).unwrap();
        if let Some(identity) = pre_enforced {
            // A previous run enforced web with `identity` and left it pinned.
            let mut dp =
                meshguard_ebpf::Datapath::load_or_adopt(&meshguard_ebpf::DatapathConfig::new(PinLayout::new(&pin_root), 1)).unwrap();
            let pod =
                meshguard_ebpf::PodEndpoint { identity, mac: [2, 0, 0, 0, 0, 0x0a], ipv4: Some(Ipv4Addr::new(10, 244, 1, 10)), ipv6: None };
            meshguard_ebpf::DatapathApi::attach(&mut dp, &meshguard_ebpf::Interface::Name("mgs-web".into()), &pod).unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ifindex = meshguard_ebpf::sys::ifindex("mgs-web").unwrap();
        let agent_cfg = cfg.clone();
        let (programs, blackhole, during) = rt.block_on(async move {
            let (view, _) = watch::channel(Arc::new(ClusterView::default()));
            let agent = tokio::spawn(meshguard_wg_agent::managed::run_with_source(agent_cfg, Box::new(Unreachable { view }), None));
            let pin = PinLayout::new(&pin_root);
            let deadline = Instant::now() + Duration::from_secs(30);
            let (mut programs, mut blackhole) = (false, false);
            while Instant::now() < deadline && !(programs && blackhole) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(!agent.is_finished(), "the agent stopped");
                programs =
                    [meshguard_ebpf::abi::PROG_FROM_POD, meshguard_ebpf::abi::PROG_TO_POD].iter().all(|p| pin.link(ifindex, p).exists());
                blackhole = ip(&["route", "show", "proto", "201"]).contains("blackhole 10.244.0.0/16");
            }
            // Blocking work on a pool thread (in this namespace: threads inherit it).
            let during = tokio::task::spawn_blocking(move || during(&endpoints, &pin)).await;
            assert!(!agent.is_finished(), "the agent stopped");
            agent.abort();
            let _ = agent.await;
            (programs, blackhole, during.expect("during panicked"))
        });
        let result = after(&cfg, ifindex);
        drop(rt);
        (programs, blackhole, during, result)
    })
    .join();
    let _ = pin.remove();
    drop(dir);
    outcome.expect("the namespace thread panicked")
}

#[test]
fn root_before_the_cluster_source_answers_pods_are_closed_and_the_blackhole_is_in() {
    let (programs, blackhole, (), ()) = with_agent("startup", None, |_, _| (), |_, _| ());
    assert!(
        programs && blackhole,
        "30 s into start-up with the cluster source unreachable: the pod's interface has {} and the strict blackhole is {}",
        if programs { "both programs" } else { "no programs (it is open)" },
        if blackhole { "routed" } else { "missing" },
    );
}

#[test]
fn root_uninstall_removes_routes_pins_and_the_tunnel() {
    let (programs, blackhole, (), after) = with_agent(
        "uninstall",
        None,
        |_, _| (),
        |cfg, ifindex| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let removed = rt.block_on(meshguard_wg_agent::managed::uninstall::uninstall(cfg)).unwrap();
            let pin = cfg.datapath.as_ref().unwrap().pin_dir.clone();
            let routes = ip(&["route", "show", "proto", "201"]) + &ip(&["-6", "route", "show", "proto", "201"]);
            let tunnel = Command::new("ip").args(["link", "show", "mgs0"]).output().unwrap().status.success();
            let links = PinLayout::new(&pin).link(ifindex, meshguard_ebpf::abi::PROG_FROM_POD).exists();
            // Again: nothing left to remove is not an error.
            let again = rt.block_on(meshguard_wg_agent::managed::uninstall::uninstall(cfg)).unwrap();
            (removed, routes, tunnel, pin.exists(), links, again)
        },
    );
    assert!(programs && blackhole, "the agent did not come up");
    let (removed, routes, tunnel, pins, links, again) = after;
    assert!(removed.routes && removed.datapath && removed.interface, "{removed:?}");
    assert_eq!(routes.trim(), "", "meshguard routes left behind");
    assert!(!tunnel, "the tunnel interface is still there");
    assert!(!pins && !links, "pins left behind");
    assert!(!again.interface, "{again:?}");
}

/// Issue 14, finding 3: a pod is closed before it can send — attached as
/// its endpoint file lands (inotify), not at a poll, and also while the
/// cluster source does not answer (the agent is still publishing). Three
/// pods, one after another, each with programs within a second of its file;
/// the backstop that would otherwise find them runs every 5 s.
#[test]
fn root_a_new_pod_is_closed_as_its_endpoint_file_lands() {
    let (programs, _, took, ()) = with_agent(
        "sync-attach",
        None,
        |endpoints, pin| {
            let mut took = Vec::new();
            for (i, name) in ["api", "db", "cache"].iter().enumerate() {
                let host = format!("mgs-{name}");
                ip(&["link", "add", &host, "type", "veth", "peer", "name", &format!("{host}-pod")]);
                ip(&["link", "set", &host, "up"]);
                let ifindex = meshguard_ebpf::sys::ifindex(&host).unwrap();
                let ep = endpoint(name, 20 + i as u8);
                // As the CNI plugin does: written aside, renamed into place.
                let tmp = endpoints.join(format!(".{}.tmp", ep.file_name()));
                std::fs::write(&tmp, meshguard_common::yaml::to_string(&ep).unwrap()).unwrap();
                let landed = Instant::now();
                std::fs::rename(&tmp, endpoints.join(ep.file_name())).unwrap();
                let attached =
                    || [meshguard_ebpf::abi::PROG_FROM_POD, meshguard_ebpf::abi::PROG_TO_POD].iter().all(|p| pin.link(ifindex, p).exists());
                while !attached() && landed.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                took.push((ifindex, landed.elapsed()));
            }
            took
        },
        |_, _| (),
    );
    assert!(programs, "the agent did not come up");
    for (ifindex, t) in &took {
        eprintln!("pod interface #{ifindex} closed {t:?} after its endpoint file landed");
        assert!(*t < Duration::from_secs(1), "interface #{ifindex} had no programs {t:?} after its file landed");
    }
}

/// A pod a previous run enforced (pinned) keeps its identity while the
/// restarted agent waits for an unreachable cluster source, through the
/// endpoint backstop and other pods' arrivals: it is adopted, never judged
/// against the empty view (which would hold it closed and cut its flows).
#[test]
fn root_an_adopted_pod_stays_enforced_while_the_source_is_unreachable() {
    let (programs, _, (), identity) = with_agent(
        "adopt",
        Some(4242),
        |endpoints, _| {
            // Another pod arrives (an inotify wake-up), and the 5 s backstop passes.
            ip(&["link", "add", "mgs-db", "type", "veth", "peer", "name", "mgs-db-pod"]);
            write_endpoint(endpoints, &endpoint("db", 11));
            std::thread::sleep(Duration::from_secs(6));
        },
        |cfg, ifindex| {
            let pin = PinLayout::new(&cfg.datapath.as_ref().unwrap().pin_dir);
            let dp = meshguard_ebpf::Datapath::load_or_adopt(&meshguard_ebpf::DatapathConfig::new(pin, 1)).unwrap();
            dp.endpoint(ifindex).unwrap().map(|e| e.identity)
        },
    );
    assert!(programs, "the agent did not come up");
    assert_eq!(identity, Some(4242), "the adopted pod lost its enforcement while the source was unreachable");
}
