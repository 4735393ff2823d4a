//! Pinning and adoption (root only; fails without root): a restarted agent
//! adopts the pinned maps and programs without flushing conntrack, pinned
//! TCX links keep enforcing while no agent runs, and removing an instance
//! detaches and frees everything.

mod support;

use std::process::Command;

use aya::programs::tc::{SchedClassifier, TcAttachType};
use meshguard_ebpf::abi::ForwardReason as F;
use meshguard_ebpf::policy::{Action, Direction, PolicyEntry, PolicySet, Ports};
use meshguard_ebpf::{Datapath, DatapathApi, Interface, PodEndpoint};
use support::*;

#[test]
fn a_new_loader_adopts_pinned_state_without_flushing_conntrack() {
    let mut h = Harness::new("adopt").with_pod();
    let entry = PolicyEntry {
        subject: POD_ID,
        peer: PEER_ID,
        direction: Direction::Egress,
        protocol: Some(TCP),
        ports: Ports::Range { first: 80, last: 80 },
        action: Action::Allow,
        cookie: 1,
    };
    let set = PolicySet { entries: vec![entry], default_deny: [(POD_ID, Direction::Egress)].into() };
    h.dp().replace_policy(&set).unwrap();
    assert_eq!(h.egress(&from_pod_v4().tcp(5000, 80, SYN)), fwd(F::PolicyAllow));
    let revision = h.dp().revision().unwrap();
    let applied = h.dp().applied_policy().clone();
    assert!(!h.dp().adopted());

    // The agent goes away; the pins stay.
    drop(h.dp.take());
    assert!(h.pin.exists());
    let dp = Datapath::load_or_adopt(&small_config(h.pin.clone())).unwrap();
    h.dp = Some(dp);
    assert!(h.dp().adopted());
    assert_eq!(h.dp().revision().unwrap(), revision, "adoption must not bump the revision");
    assert_eq!(h.dp().applied_policy(), &applied);
    assert_eq!(h.dp().conntrack().unwrap().len(), 1);
    // The established flow carries on without re-evaluation; new ones are still judged.
    assert_eq!(h.ingress(&to_pod_v4().tcp(80, 5000, SYN | ACK)), fwd(F::CtReply));
    assert_eq!(h.egress(&from_pod_v4().tcp(5001, 81, SYN)), drop_(meshguard_ebpf::abi::DropReason::PolicyDefault));
}

#[test]
fn instances_are_separate_and_removal_is_complete() {
    let mut a = Harness::new("inst-a").with_pod();
    let mut b = Harness::new("inst-b").with_pod();
    let set = PolicySet { entries: vec![], default_deny: [(POD_ID, Direction::Egress)].into() };
    a.dp().replace_policy(&set).unwrap();
    assert_eq!(a.egress(&from_pod_v4().udp(1, 2)), drop_(meshguard_ebpf::abi::DropReason::PolicyDefault));
    assert_eq!(b.egress(&from_pod_v4().udp(1, 2)), fwd(F::Unselected));
    let root = a.pin.root().to_owned();
    a.dp.take().unwrap().remove().unwrap();
    assert!(!root.exists());
}

/// Runs `f` on a thread inside a fresh network namespace holding a veth pair.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        // Children forked from this thread start in its namespace.
        let ok = Command::new("ip").args(["link", "add", "mgt-host", "type", "veth", "peer", "name", "mgt-pod"]).status().unwrap();
        assert!(ok.success(), "ip link add failed");
        f()
    })
    .join()
    .unwrap()
}

fn tcx_programs(ifname: &str, kind: TcAttachType) -> usize {
    SchedClassifier::query_tcx(ifname, kind).map(|(_, p)| p.len()).unwrap_or(0)
}

/// Unpinning releases a link asynchronously (the inode goes after an RCU
/// grace period): wait up to a second for the count to settle.
fn settles_at(ifname: &str, kind: TcAttachType, want: usize) -> usize {
    for _ in 0..100 {
        if tcx_programs(ifname, kind) == want {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tcx_programs(ifname, kind)
}

#[test]
fn pods_attach_with_pinned_tcx_links_that_outlive_the_agent() {
    require_root();
    let pin = test_pin("attach");
    let cleanup = pin.clone();
    in_netns(move || {
        let mut dp = Datapath::load_or_adopt(&small_config(pin.clone())).unwrap();
        let iface = Interface::Name("mgt-host".into());
        let pod = PodEndpoint { identity: POD_ID, mac: POD_MAC, ipv4: Some(pod_v4()), ipv6: None };
        dp.attach(&iface, &pod).unwrap();
        let ifindex = meshguard_ebpf::sys::ifindex("mgt-host").unwrap();
        assert_eq!(dp.attached(), vec![ifindex]);
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Ingress), 1);
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Egress), 1);
        // Attaching again replaces the link, never stacks a second one.
        dp.attach(&iface, &pod).unwrap();
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Ingress), 1);

        // The agent exits: the pinned links keep the programs attached.
        drop(dp);
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Ingress), 1);
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Egress), 1);

        // A restarted agent adopts, then detaches the pod.
        let mut dp = Datapath::load_or_adopt(&small_config(pin.clone())).unwrap();
        assert!(dp.adopted());
        assert_eq!(dp.endpoint(ifindex).unwrap().map(|e| e.identity), Some(POD_ID));
        dp.detach(&iface).unwrap();
        assert_eq!(settles_at("mgt-host", TcAttachType::Ingress, 0), 0);
        assert_eq!(settles_at("mgt-host", TcAttachType::Egress, 0), 0);
        assert!(dp.attached().is_empty());
        assert_eq!(dp.endpoint(ifindex).unwrap(), None);

        // Removing the instance detaches whatever is still attached.
        dp.attach(&iface, &pod).unwrap();
        dp.remove().unwrap();
        assert_eq!(settles_at("mgt-host", TcAttachType::Ingress, 0), 0);
        assert_eq!(settles_at("mgt-host", TcAttachType::Egress, 0), 0);
    });
    let _ = cleanup.remove();
}

/// Issue 14, findings 1 and 2: an attachment that fails after the programs
/// are on (a reserved identity, an ifindex past the endpoint map) leaves the
/// interface with both programs and no endpoint entry — dropping every
/// packet (`unknown_interface_is_dropped` in verdicts.rs) — never open.
#[test]
fn a_failed_attach_leaves_the_interface_closed_not_open() {
    require_root();
    let pin = test_pin("attach-fails");
    let cleanup = pin.clone();
    in_netns(move || {
        let ok = Command::new("ip")
            .args(["link", "add", "mgt-big", "index", "200", "type", "veth", "peer", "name", "mgt-big-pod"])
            .status()
            .unwrap();
        assert!(ok.success(), "ip link add index 200 failed");
        let mut dp = Datapath::load_or_adopt(&small_config(pin.clone())).unwrap();
        let ifindex = meshguard_ebpf::sys::ifindex("mgt-host").unwrap();
        let pod = PodEndpoint { identity: POD_ID, mac: POD_MAC, ipv4: Some(pod_v4()), ipv6: None };
        // Enforced first, then re-keyed to an identity the datapath refuses.
        dp.attach(&Interface::Name("mgt-host".into()), &pod).unwrap();
        let reserved = PodEndpoint { identity: 2, ..pod.clone() };
        let err = dp.attach(&Interface::Name("mgt-host".into()), &reserved).unwrap_err();
        assert!(matches!(err, meshguard_ebpf::DatapathError::ReservedIdentity { identity: 2 }), "{err}");
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Ingress), 1);
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Egress), 1);
        assert_eq!(dp.endpoint(ifindex).unwrap(), None, "the old identity must not stay");

        // An interface index the endpoint map cannot hold (64 entries here).
        let err = dp.attach(&Interface::Name("mgt-big".into()), &pod).unwrap_err();
        assert!(matches!(err, meshguard_ebpf::DatapathError::IfindexTooLarge { ifindex: 200, .. }), "{err}");
        assert_eq!(tcx_programs("mgt-big", TcAttachType::Ingress), 1);
        assert_eq!(tcx_programs("mgt-big", TcAttachType::Egress), 1);

        // Held closed on purpose: programs on, entry gone, conntrack flushed.
        dp.attach(&Interface::Name("mgt-host".into()), &pod).unwrap();
        assert_eq!(dp.hold_closed(&Interface::Name("mgt-host".into())).unwrap(), ifindex);
        assert_eq!(dp.endpoint(ifindex).unwrap(), None);
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Ingress), 1);
        dp.remove().unwrap();
    });
    let _ = cleanup.remove();
}

/// Our TC clsact filters on a hook (`tc filter show`, by our handle).
fn tc_filters(ifname: &str, hook: &str) -> usize {
    let out = Command::new("tc").args(["filter", "show", "dev", ifname, hook]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("handle 0x6d67") && l.contains("direct-action")).count()
}

/// Issue 14: kernels before 6.6 have no TCX. Forced here, the fallback
/// attaches the same programs as TC clsact filters, which outlive the
/// agent, are replaced in place (never stacked), and go with detach and
/// with the instance; traffic is judged by them (a real packet through
/// the veth, dropped while the interface is held closed, passed once the
/// pod is enforced).
#[test]
fn the_tc_clsact_fallback_attaches_the_same_programs_when_forced() {
    require_root();
    let pin = test_pin("attach-tc");
    let cleanup = pin.clone();
    in_netns(move || {
        let mut cfg = small_config(pin.clone());
        cfg.attach = meshguard_ebpf::AttachMode::Tc;
        let mut dp = Datapath::load_or_adopt(&cfg).unwrap();
        assert_eq!(dp.attach_mode(), meshguard_ebpf::AttachMode::Tc);
        let iface = Interface::Name("mgt-host".into());
        let ifindex = meshguard_ebpf::sys::ifindex("mgt-host").unwrap();
        let pod = PodEndpoint { identity: POD_ID, mac: POD_MAC, ipv4: Some(pod_v4()), ipv6: None };

        // Held closed: the filters drop what the pod sends.
        dp.hold_closed(&iface).unwrap();
        assert_eq!((tc_filters("mgt-host", "ingress"), tc_filters("mgt-host", "egress")), (1, 1));
        assert_eq!(tcx_programs("mgt-host", TcAttachType::Ingress), 0, "no TCX link in tc mode");
        let before = dp.counters().unwrap();
        send_from_pod();
        let after = dp.counters().unwrap();
        let dropped = |c: &meshguard_ebpf::Counters| {
            c.get(&(Direction::Egress, meshguard_ebpf::abi::Code::Drop(meshguard_ebpf::abi::DropReason::UnknownEndpoint)))
                .map_or(0, |v| v.packets)
        };
        assert!(dropped(&after) > dropped(&before), "the tc filter judged the pod's packet");

        // Enforced, attached again: replaced in place, not stacked.
        dp.attach(&iface, &pod).unwrap();
        dp.attach(&iface, &pod).unwrap();
        assert_eq!((tc_filters("mgt-host", "ingress"), tc_filters("mgt-host", "egress")), (1, 1));
        assert_eq!(dp.attached(), vec![ifindex]);
        assert!(dp.enforced(&iface).unwrap().is_some());

        // The agent exits: the filters stay; a restarted agent adopts them.
        drop(dp);
        assert_eq!((tc_filters("mgt-host", "ingress"), tc_filters("mgt-host", "egress")), (1, 1));
        let mut dp = Datapath::load_or_adopt(&cfg).unwrap();
        assert_eq!(dp.enforced(&iface).unwrap().map(|(i, p)| (i, p.identity)), Some((ifindex, POD_ID)));
        dp.detach(&iface).unwrap();
        assert_eq!((tc_filters("mgt-host", "ingress"), tc_filters("mgt-host", "egress")), (0, 0));
        assert!(dp.attached().is_empty());

        // Removing the instance deletes what is still attached.
        dp.attach(&iface, &pod).unwrap();
        dp.remove().unwrap();
        assert_eq!((tc_filters("mgt-host", "ingress"), tc_filters("mgt-host", "egress")), (0, 0));
    });
    let _ = cleanup.remove();
}

/// One frame from the pod side of the veth pair (it arrives at the host
/// side's ingress hook).
fn send_from_pod() {
    assert!(Command::new("ip").args(["link", "set", "mgt-host", "up"]).status().unwrap().success());
    assert!(Command::new("ip").args(["link", "set", "mgt-pod", "up"]).status().unwrap().success());
    let pod = meshguard_ebpf::sys::ifindex("mgt-pod").unwrap();
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&POD_MAC);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.extend_from_slice(&[0; 28]);
    for _ in 0..50 {
        // The veth may take a moment to come up (carrier).
        if meshguard_ebpf::sys::packet_send(pod, &frame, 0).is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("cannot send from the pod side");
}
