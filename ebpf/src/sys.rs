//! The small syscall edge: kernel clocks the datapath uses, interface
//! names, and BPF_PROG_TEST_RUN (which aya does not expose).

// Every unsafe block here wraps one libc call; each has a SAFETY note.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids used here
    // exist on every kernel meshguard supports.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed: {}", io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_BOOTTIME: `bpf_ktime_get_boot_ns()`, the auth map's clock.
pub fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// CLOCK_MONOTONIC.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

pub fn ifname(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The running kernel's (major, minor) version; (0, 0) if unreadable.
pub fn kernel_version() -> (u32, u32) {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid utsname for uname to write.
    if unsafe { libc::uname(&mut u) } != 0 {
        return (0, 0);
    }
    let release: String = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect();
    parse_kernel_version(&release)
}

/// "6.1.0-18-amd64" -> (6, 1).
pub fn parse_kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (TC_ACT_OK = 0, TC_ACT_SHOT = 2).
    pub retval: u32,
    /// Mean nanoseconds per repetition, as the kernel measured it.
    pub duration_ns: u32,
    /// The packet after the program ran.
    pub data_out: Vec<u8>,
}

/// Runs a program once per `repeat` on a copy of `packet` (an Ethernet
/// frame for TC programs), in the kernel, without any interface.
pub fn test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> io::Result<TestRun> {
    test_run_skb(prog, packet, repeat, SkbCtx::default())
}

/// What a TC test run sets in the packet's `struct __sk_buff`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkbCtx {
    pub mark: u32,
    /// The interface the packet entered the host by (0: sent by the host).
    pub ingress_ifindex: u32,
}

/// `struct __sk_buff` up to `ingress_ifindex` (the kernel refuses a context
/// with fields set that a test run cannot take; the rest is zero).
#[repr(C)]
#[derive(Default)]
struct SkBuffPrefix {
    len: u32,
    pkt_type: u32,
    mark: u32,
    queue_mapping: u32,
    protocol: u32,
    vlan_present: u32,
    vlan_tci: u32,
    vlan_proto: u32,
    priority: u32,
    ingress_ifindex: u32,
}

/// As [`test_run`], with `ctx` as the packet's `__sk_buff` fields.
pub fn test_run_skb(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32, ctx: SkbCtx) -> io::Result<TestRun> {
    let mut ctx = SkBuffPrefix { mark: ctx.mark, ingress_ifindex: ctx.ingress_ifindex, ..Default::default() };
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<SkBuffPrefix>() as u32,
        ctx_in: &mut ctx as *mut SkBuffPrefix as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a correctly laid out bpf_attr prefix whose pointers
    // reference `packet` and `ctx` (read) and `out` (written up to data_size_out),
    // both alive for the duration of the call; the kernel accepts a shorter
    // attr and zero-fills the rest.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestRunAttr, std::mem::size_of::<TestRunAttr>() as u32)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(TestRun { retval: attr.retval, duration_ns: attr.duration, data_out: out })
}

/// `BPF_F_TEST_XDP_LIVE_FRAMES`: the XDP program's verdicts act on real
/// frames (XDP_PASS hands the frame to the interface's receive path).
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// `struct xdp_md`, the context of an XDP test run.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Runs an XDP program once on `frame` in live-frames mode, as received on
/// `ifindex` (in the caller's network namespace): on XDP_PASS the kernel
/// delivers the frame to that interface's receive path, TC ingress first.
pub fn xdp_live_run(prog: BorrowedFd<'_>, ifindex: u32, frame: &[u8]) -> io::Result<()> {
    let mut ctx = XdpMd { data_end: frame.len() as u32, ingress_ifindex: ifindex, ..Default::default() };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: &mut ctx as *mut XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    // SAFETY: `attr` is a correctly laid out bpf_attr prefix; its pointers
    // reference `frame` and `ctx` (read only in live mode, no output
    // buffers), both alive for the duration of the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestRunAttr, std::mem::size_of::<TestRunAttr>() as u32)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `frame` (Ethernet header first) out of interface `ifindex` in the
/// caller's network namespace through a packet socket: the frame takes the
/// device's transmit path, TC egress included, with `mark` as its skb mark.
pub fn packet_send(ifindex: u32, frame: &[u8], mark: u32) -> io::Result<()> {
    if frame.len() < 14 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a frame is at least an Ethernet header"));
    }
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is not owned elsewhere.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    if mark != 0 {
        // SAFETY: SO_MARK takes a u32 option value of the length given.
        let rc = unsafe {
            libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, (&mark as *const u32).cast(), size_of::<u32>() as u32)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `to` are valid for the lengths given for the call's duration.
    let rc = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `fd` is readable or `timeout_ms` passes; true when readable.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, count 1; a stale fd only makes poll report POLLNVAL.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0)
}

/// Sets an interface administratively down (`ip link set NAME down`): the
/// last resort when its programs cannot be attached, so a pod that cannot
/// be enforced cannot send either.
pub fn set_link_down(name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IF_NAMESIZE || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an interface name"));
    }
    // SAFETY: socket() has no memory preconditions; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming the interface (NUL-terminated by
    // the zeroing above); SIOCGIFFLAGS fills ifru_flags, SIOCSIFFLAGS reads it.
    let rc = unsafe {
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &mut req);
        }
        rc
    };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is ours and closed exactly once.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions_parse() {
        assert_eq!(super::parse_kernel_version("6.1.0-18-amd64"), (6, 1));
        assert_eq!(super::parse_kernel_version("6.18.0"), (6, 18));
        assert_eq!(super::parse_kernel_version("5.15.0-91-generic"), (5, 15));
        assert_eq!(super::parse_kernel_version("garbage"), (0, 0));
    }
}
