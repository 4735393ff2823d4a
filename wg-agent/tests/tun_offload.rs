//! The TUN's offloads on a persistent interface (root only; fails without
//! root). Offloads belong to the interface, not to the file that set them:
//! an agent restarted with offloads off (or an older agent, which reads
//! packets without a virtio-net header) must not inherit the previous
//! owner's TSO, or it would read 64 KiB super-packets it cannot parse. An
//! orderly close turns them off; a new owner sets them explicitly, which
//! covers an owner that died without closing.

use std::os::fd::AsRawFd;
use std::process::Command;

use meshguard_wg_agent::io::tun::LinuxTun;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test creates a network namespace and a TUN device: run it as root");
}

/// `ethtool -k` feature `name` of `ifname`: on or off.
fn feature(ifname: &str, name: &str) -> bool {
    let out = Command::new("ethtool").args(["-k", ifname]).output().expect("ethtool (apt-get install ethtool)");
    assert!(out.status.success(), "ethtool -k {ifname}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.trim_start().starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("no {name} in {text}"));
    line.split(':').nth(1).unwrap().trim().starts_with("on")
}

#[test]
fn root_a_reattached_persistent_tun_takes_the_new_owners_offloads() {
    require_root();
    std::thread::spawn(|| {
        // SAFETY: unshare changes only this thread's namespaces (and those of
        // the processes it starts); the interface dies with the namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        let name = "mgoffload0";

        let tun = LinuxTun::open_with(name, true, true).unwrap();
        assert!(tun.offload().tso, "this kernel takes TSO on a TUN");
        assert!(feature(name, "tcp-segmentation-offload"));
        drop(tun);
        // Let go of in order, the interface is left with no offloads.
        assert!(!feature(name, "tcp-segmentation-offload"), "TSO left on after the owner closed the interface");

        // An owner that died without closing in order (kill -9): the kernel
        // only sees its descriptor go, and the offloads stay on.
        let tun = LinuxTun::open_with(name, true, true).unwrap();
        let fd = tun.as_raw_fd();
        std::mem::forget(tun);
        // SAFETY: `fd` is the forgotten device's own descriptor, closed once.
        assert_eq!(unsafe { libc::close(fd) }, 0);
        assert!(feature(name, "tcp-segmentation-offload"), "the dead owner's TSO is still on");

        // Restarted with offloads off: the interface must stop segmenting for us.
        let tun = LinuxTun::open_with(name, true, false).unwrap();
        assert_eq!(tun.offload().to_string(), "none");
        assert!(!feature(name, "tcp-segmentation-offload"), "TSO left on from the previous owner");
        drop(tun);

        // And on again.
        let tun = LinuxTun::open_with(name, true, true).unwrap();
        assert!(feature(name, "tcp-segmentation-offload"));
        tun.delete().unwrap();
    })
    .join()
    .unwrap();
}
