//! The compiled eBPF objects, embedded 8-byte aligned (ELF parsing needs it).

/// The datapath: `mg_from_pod` and `mg_to_pod` and every map.
pub static DATAPATH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshguard.o"));

/// The datapath built with `MG_BENCH_NEWFLOW`: every run is a new flow
/// (`bpf/lib/bench.h`). Benchmarks only.
pub static DATAPATH_BENCH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshguard_bench.o"));

/// Floor programs for the benchmark (`bpf/floors.c`).
pub static FLOORS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floors.o"));

/// Never loaded: carries the BTF of every shared type (`bpf/abi.c`).
pub static ABI: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/abi.o"));

/// `mg_replay`: replays a held frame into an interface's receive path (`bpf/replay.c`).
pub static REPLAY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/replay.o"));
