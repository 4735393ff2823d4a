//! A BPF ring buffer consumer, libbpf's algorithm.
//!
//! Not aya 0.13's `RingBuf`: it starts its cached producer position at 0, so
//! a consumer that opens a pinned ring whose consumer position is not 0 — a
//! restarted agent adopting its datapath after events were read — walks past
//! the producer into stale memory, item after empty item, without ever
//! returning, and starves the runtime it runs on. Here both positions are
//! read from the shared pages on every call.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aya::maps::MapData;

/// `BPF_RINGBUF_BUSY_BIT`, `BPF_RINGBUF_DISCARD_BIT`, `BPF_RINGBUF_HDR_SZ` (uapi/linux/bpf.h).
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HDR_SZ: u64 = 8;

/// The consumer page (read-write) and the producer page plus the data area,
/// which the kernel maps twice in a row so a record never wraps.
pub struct Ring {
    map: MapData,
    consumer: NonNull<u8>,
    producer: NonNull<u8>,
    page: usize,
    size: u64,
}

// SAFETY: the mappings are plain shared memory owned by this value; every
// access goes through atomics or bounded copies, from one thread at a time (&mut self).
#[allow(unsafe_code)]
unsafe impl Send for Ring {}

// === impl Ring ===

impl Ring {
    #[allow(unsafe_code)]
    pub fn new(map: MapData) -> io::Result<Self> {
        let size = u64::from(map.info().map_err(io::Error::other)?.max_entries());
        if !size.is_power_of_two() {
            return Err(io::Error::other(format!("ring buffer size {size} is not a power of two")));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).map_err(|_| io::Error::other("no page size"))?;
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = mmap(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = match mmap(fd, page + 2 * size as usize, libc::PROT_READ, page as libc::off_t) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: `consumer` was mapped just above with this length.
                unsafe { libc::munmap(consumer.as_ptr().cast(), page) };
                return Err(e);
            }
        };
        Ok(Self { map, consumer, producer, page, size })
    }

    /// The next record's bytes, or `None` when nothing committed is waiting.
    #[allow(unsafe_code)]
    pub fn next(&mut self) -> Option<Vec<u8>> {
        // SAFETY: both positions are the first 8 bytes of their page, which
        // stay mapped while self lives; the kernel updates them atomically.
        let (cons_pos, prod_pos) = unsafe { (self.consumer.cast::<AtomicU64>().as_ref(), self.producer.cast::<AtomicU64>().as_ref()) };
        let mut cons = cons_pos.load(Ordering::Acquire);
        loop {
            let prod = prod_pos.load(Ordering::Acquire);
            if cons == prod {
                return None;
            }
            let off = (cons & (self.size - 1)) as usize;
            // SAFETY: `off` < size, so the header and a record of up to `size`
            // bytes lie within the double-mapped data area after the producer page.
            let data = unsafe { self.producer.as_ptr().add(self.page) };
            let header = unsafe { &*data.add(off).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = u64::from(header & !(BUSY_BIT | DISCARD_BIT));
            if len > self.size {
                // Not a record: positions that disagree with the data. Stop
                // rather than read garbage.
                return None;
            }
            let item = (header & DISCARD_BIT == 0).then(|| {
                // SAFETY: bounded by the check above and the double mapping.
                unsafe { std::slice::from_raw_parts(data.add(off + HDR_SZ as usize), len as usize) }.to_vec()
            });
            cons += (len + HDR_SZ).div_ceil(8) * 8;
            cons_pos.store(cons, Ordering::Release);
            if item.is_some() {
                return item;
            }
        }
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

impl Drop for Ring {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: both regions were mapped in `new` with these lengths.
        unsafe {
            libc::munmap(self.consumer.as_ptr().cast(), self.page);
            libc::munmap(self.producer.as_ptr().cast(), self.page + 2 * self.size as usize);
        }
    }
}

#[allow(unsafe_code)]
fn mmap(fd: RawFd, len: usize, prot: i32, offset: libc::off_t) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the
    // length, protection and offset against the ring buffer's layout.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}
