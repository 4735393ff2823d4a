//! ns per packet through BPF_PROG_TEST_RUN (repeat mode): the established-
//! flow and new-flow verdicts at two table sizes, next to floor programs
//! that do only the unavoidable work, measured in the same run.
//!
//!     sudo -E cargo bench -p meshguard-ebpf --bench datapath
//!
//! (root: it loads eBPF programs; a release build, as `cargo bench` is.)
//! `MESHGUARD_BENCH_SCALES=1` runs the small tables only.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::time::Instant;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use meshguard_ebpf::abi::{self, BenchConfig, Code, CtEntry, CtKey, ForwardReason, IpcacheKeyData, IpcacheValue};
use meshguard_ebpf::policy::{Action, Direction, PolicyEntry, PolicySet, Ports};
use meshguard_ebpf::sys::test_run;
use meshguard_ebpf::{Datapath, DatapathApi, DatapathConfig, IpcacheEntry, MapSizes, PinLayout, PodEndpoint};

const POD_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const BASE: u32 = 0x0a40_0000; // 10.64.0.0: identity i holds BASE + i
const FLOOR_INSERT_BASE: u32 = 0x0b00_0000; // 11.0.0.0: never a datapath flow
const FIRST_ID: u32 = 256;
/// Peers the new-flow benchmark cycles through (32768 source ports each).
const NEW_FLOW_PEERS: u32 = 64;
const ROUNDS: usize = 7;
const LOOKUP_REPEAT: u32 = 200_000;
const INSERT_REPEAT: u32 = 10_000;

struct Scale {
    identities: u32,
    policies: u32,
    flows: u32,
}

struct Figures {
    empty: f64,
    hash: f64,
    lpm: f64,
    lpm_ipcache: f64,
    insert: f64,
    established: f64,
    new_flow: f64,
}

fn ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(BASE + i)
}

/// An Ethernet/IPv4/TCP SYN from `src:sport` to `dst:80`.
fn frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut b = vec![0u8; 14 + 20 + 20];
    b[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    b[6..12].copy_from_slice(&POD_MAC);
    b[12..14].copy_from_slice(&[0x08, 0x00]);
    b[14] = 0x45;
    b[16..18].copy_from_slice(&40u16.to_be_bytes());
    b[22] = 64;
    b[23] = 6;
    b[26..30].copy_from_slice(&src.octets());
    b[30..34].copy_from_slice(&dst.octets());
    b[34..36].copy_from_slice(&sport.to_be_bytes());
    b[36..38].copy_from_slice(&80u16.to_be_bytes());
    b[46] = 5 << 4;
    b[47] = 0x02;
    b
}

/// Median of the rounds; the spread goes to stderr (the machine is shared).
fn measure(prog: &SchedClassifier, pkt: &[u8], repeat: u32) -> f64 {
    let fd = prog.fd().unwrap();
    let _ = test_run(fd.as_fd(), pkt, repeat.min(1000)).unwrap(); // warm up
    let mut v: Vec<f64> = (0..ROUNDS).map(|_| test_run(fd.as_fd(), pkt, repeat).unwrap().duration_ns as f64).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    eprintln!("    rounds: {v:?}");
    v[v.len() / 2]
}

fn load_prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    p.load().unwrap();
    p
}

fn counted(dp: &Datapath, code: ForwardReason) -> u64 {
    dp.counters().unwrap().get(&(Direction::Egress, Code::Forward(code))).map_or(0, |c| c.packets)
}

fn run_scale(s: &Scale) -> Figures {
    let t0 = Instant::now();
    let pin = PinLayout::new(format!("/sys/fs/bpf/meshguard-bench/{}-{}", std::process::id(), s.identities));
    let _ = pin.remove();
    // Room for the flows the benchmark itself creates, so no insert evicts.
    let headroom = (ROUNDS as u32 + 2) * INSERT_REPEAT * 2 + 10_000;
    let mut cfg = DatapathConfig::new(pin.clone(), 1);
    cfg.sizes = MapSizes {
        endpoints: 64,
        ipcache: s.identities + 16,
        policy: s.policies + NEW_FLOW_PEERS + 16,
        subjects: 2 * s.identities + 16,
        auth: 1024,
        conntrack: s.flows + headroom,
        fragments: 1024,
    };
    let mut dp = Datapath::load_or_adopt(&cfg).expect("load the datapath (root needed)");
    let pod = PodEndpoint { identity: FIRST_ID, mac: POD_MAC, ipv4: Some(ip(0)), ipv6: None };
    dp.set_endpoint(1, &pod).unwrap();

    // ipcache: one /32 per identity.
    let entries: Vec<_> = (0..s.identities)
        .map(|i| (ipnet::IpNet::from(std::net::IpAddr::from(ip(i))), IpcacheEntry { identity: FIRST_ID + i, node_id: 1 + i % 100 }))
        .collect();
    dp.set_ipcache(&entries).unwrap();

    // Policy: the pod may reach the new-flow peers on TCP 80; the rest of the
    // table is other subjects' entries, 1 trie prefix each.
    let mut policy = PolicySet::default();
    policy.default_deny.insert((FIRST_ID, Direction::Egress));
    for i in 1..=NEW_FLOW_PEERS {
        policy.entries.push(PolicyEntry {
            subject: FIRST_ID,
            peer: FIRST_ID + i,
            direction: Direction::Egress,
            protocol: Some(6),
            ports: Ports::Range { first: 80, last: 80 },
            action: Action::Allow,
            cookie: i,
        });
    }
    for k in 0..s.policies - NEW_FLOW_PEERS {
        let subject = FIRST_ID + 1 + k % (s.identities - 1);
        let peer = FIRST_ID + (k / (s.identities - 1) + subject) % s.identities;
        policy.entries.push(PolicyEntry {
            subject,
            peer,
            direction: if k % 2 == 0 { Direction::Egress } else { Direction::Ingress },
            protocol: Some(if k % 3 == 0 { 17 } else { 6 }),
            ports: Ports::Range { first: 80 + (k % 7) as u16, last: 80 + (k % 7) as u16 },
            action: Action::Allow,
            cookie: k,
        });
    }
    dp.replace_policy(&policy).unwrap();
    let trie_entries = dp.applied_policy().trie.len();

    // Conntrack: the tracked flows of other pods.
    let revision = dp.revision().unwrap();
    let expires = dp.jiffies_now().unwrap() + 3600 * u64::from(dp.hz());
    for j in 0..s.flows {
        let mut key = CtKey { protocol: 6, family: abi::MG_FAMILY_IPV4, ..Default::default() };
        key.local_addr[..4].copy_from_slice(&ip(j % s.identities).octets());
        key.remote_addr[..4].copy_from_slice(&ip((j.wrapping_mul(31) + 7) % s.identities).octets());
        key.local_port = (10_000 + (j / s.identities) as u16).to_be();
        key.remote_port = 443u16.to_be();
        let entry = CtEntry {
            expires,
            policy_revision: revision,
            peer_identity: FIRST_ID,
            peer_node: 1,
            policy_port: 443u16.to_be(),
            flags: abi::MG_CT_F_EGRESS | abi::MG_CT_F_REPLY_SEEN,
        };
        dp.insert_conntrack(&key, &entry).unwrap();
    }
    let tracked = dp.conntrack().unwrap().len();
    eprintln!(
        "  set up in {:.1}s: {} identities, {} policy entries ({} trie prefixes), {} tracked flows",
        t0.elapsed().as_secs_f64(),
        s.identities,
        policy.entries.len(),
        trie_entries,
        tracked
    );

    // The established flow: created once by the real program.
    let established = frame(ip(0), ip(1), 50_000);
    let from_pod_fd = dp.program_fd(true).unwrap();
    assert_eq!(test_run(from_pod_fd, &established, 1).unwrap().retval, 0, "the established flow must be admitted");
    let before = counted(&dp, ForwardReason::CtEstablished);
    let from_pod = SchedClassifier::from_pin(pin.prog(abi::PROG_FROM_POD)).unwrap();
    let established_ns = measure(&from_pod, &established, LOOKUP_REPEAT);
    let hits = counted(&dp, ForwardReason::CtEstablished) - before;
    assert!(hits >= u64::from(LOOKUP_REPEAT) * ROUNDS as u64, "every established repetition must hit conntrack ({hits})");

    // New flows: the MG_BENCH_NEWFLOW build of the same program, on the same
    // pinned maps; each repetition gets a fresh (source port, peer).
    let mut newflow = EbpfLoader::new().map_pin_path(pin.maps()).load(meshguard_ebpf::objects::DATAPATH_BENCH).unwrap();
    let mut bench_cfg: Array<MapData, BenchConfig> = Array::try_from(newflow.take_map(abi::MAP_BENCH).unwrap()).unwrap();
    bench_cfg.set(0, BenchConfig { counter: 0, base_v4: BASE + 1, pad: 0 }, 0).unwrap();
    let prog = load_prog(&mut newflow, abi::PROG_FROM_POD);
    let before = counted(&dp, ForwardReason::PolicyAllow);
    let new_flow_ns = measure(prog, &established, INSERT_REPEAT);
    let created = counted(&dp, ForwardReason::PolicyAllow) - before;
    let runs = bench_cfg.get(&0, 0).unwrap().counter;
    assert!(runs < u64::from(NEW_FLOW_PEERS) * 32768, "new-flow keys would repeat");
    assert_eq!(created, runs, "every new-flow repetition must be admitted as a new flow");

    // Floors, on the same pinned conntrack and ipcache.
    let mut floors = EbpfLoader::new()
        .map_pin_path(pin.maps())
        .set_max_entries(abi::MAP_FLOOR_TRIE, trie_entries as u32 + 16)
        .load(meshguard_ebpf::objects::FLOORS)
        .unwrap();
    // Kept until the programs using it are measured.
    let mut trie: LpmTrie<MapData, IpcacheKeyData, IpcacheValue> =
        LpmTrie::try_from(floors.take_map(abi::MAP_FLOOR_TRIE).unwrap()).unwrap();
    for i in 0..trie_entries as u32 {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&ip(i).octets());
        let key = Key::new(abi::MG_IPCACHE_PREFIX_BASE + 32, IpcacheKeyData { family: abi::MG_FAMILY_IPV4, pad: [0; 3], addr });
        trie.insert(&key, IpcacheValue { identity: i, node_id: 1 }, 0).unwrap();
    }
    let mut floor_cfg: Array<MapData, BenchConfig> = Array::try_from(floors.take_map(abi::MAP_BENCH).unwrap()).unwrap();
    floor_cfg.set(0, BenchConfig { counter: 0, base_v4: FLOOR_INSERT_BASE, pad: 0 }, 0).unwrap();
    let f = |floors: &mut Ebpf, name: &str, repeat| {
        let p = load_prog(floors, name);
        measure(p, &established, repeat)
    };
    let empty = f(&mut floors, abi::PROG_FLOOR_EMPTY, LOOKUP_REPEAT);
    let hash = f(&mut floors, abi::PROG_FLOOR_HASH, LOOKUP_REPEAT);
    let lpm = f(&mut floors, abi::PROG_FLOOR_LPM, LOOKUP_REPEAT);
    let lpm_ipcache = f(&mut floors, abi::PROG_FLOOR_LPM_IPCACHE, LOOKUP_REPEAT);
    let insert = f(&mut floors, abi::PROG_FLOOR_INSERT, INSERT_REPEAT);

    drop(floors);
    drop(trie);
    drop(newflow);
    dp.remove().unwrap();
    if let Some(parent) = pin.root().parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Figures { empty, hash, lpm, lpm_ipcache, insert, established: established_ns, new_flow: new_flow_ns }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the datapath benchmark loads eBPF programs: run it as root (sudo -E cargo bench -p meshguard-ebpf --bench datapath)"
    );
    // `cargo bench` passes --bench; a `cargo test` of benches passes nothing
    // we need to honour: run anyway, it is quick enough at the small scale.
    let scales: usize = std::env::var("MESHGUARD_BENCH_SCALES").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let all = [
        Scale { identities: 10_000, policies: 100_000, flows: 100_000 },
        Scale { identities: 100_000, policies: 1_000_000, flows: 1_000_000 },
    ];
    let mut results = Vec::new();
    for s in all.iter().take(scales.clamp(1, 2)) {
        println!("tables: {} identities, {} policy entries, {} tracked flows", s.identities, s.policies, s.flows);
        let r = run_scale(s);
        println!("  floor: empty TC program            {:7.1} ns", r.empty);
        println!("  floor: one 5-tuple hash lookup      {:7.1} ns", r.hash);
        println!("  floor: one /32 LPM lookup (policy-size trie) {:7.1} ns", r.lpm);
        println!("  floor: one /32 LPM lookup (ipcache)  {:7.1} ns", r.lpm_ipcache);
        println!("  floor: one conntrack-style insert    {:7.1} ns", r.insert);
        let est_ratio = r.established / r.hash;
        let new_ratio = r.new_flow / (r.lpm + r.insert);
        println!(
            "  established-flow verdict          {:7.1} ns  = {:.2}x the hash floor (target <= 1.25x) {}",
            r.established,
            est_ratio,
            if est_ratio <= 1.25 { "ok" } else { "MISSED" }
        );
        println!(
            "  new-flow verdict                  {:7.1} ns  = {:.2}x LPM + insert floors (target <= 1.5x) {}",
            r.new_flow,
            new_ratio,
            if new_ratio <= 1.5 { "ok" } else { "MISSED" }
        );
        results.push(r);
    }
    if let [small, large] = &results[..] {
        let e = large.established / small.established;
        let n = large.new_flow / small.new_flow;
        println!("small -> 10x tables (target within 20%):");
        println!("  established {:.2}x {}", e, if (0.8..=1.2).contains(&e) { "ok" } else { "MISSED" });
        println!("  new flow    {:.2}x {}", n, if (0.8..=1.2).contains(&n) { "ok" } else { "MISSED" });
    }
}
