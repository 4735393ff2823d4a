//! The Rust mirrors in `meshguard_ebpf::abi` against the C layout, as the
//! compiled `bpf/abi.c` records it in BTF. Needs no privileges.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use meshguard_ebpf::abi::{self, *};
use meshguard_ebpf::btf::Btf;
use meshguard_ebpf::objects;

/// (C struct, Rust size, [(field, Rust offset)]).
macro_rules! layout {
    ($c:literal, $t:ty { $($f:ident),* $(,)? }) => {
        ($c, size_of::<$t>(), vec![$((stringify!($f).trim_start_matches("r#"), offset_of!($t, $f))),*])
    };
}

fn btf() -> Btf {
    Btf::from_elf(objects::ABI).expect("abi.o has BTF")
}

#[test]
fn structs_match_the_c_headers() {
    let btf = btf();
    let mirrors = vec![
        layout!(
            "mg_config",
            Config {
                flags,
                policy_revision,
                local_node_id,
                any_subject_flags,
                hz,
                ct_timeout,
                auth_signal_interval_ns,
                tunnel_ifindex,
                pad
            }
        ),
        layout!("mg_endpoint", Endpoint { identity, flags, mac, pad, ipv4, ipv6 }),
        layout!("mg_ipcache_key", IpcacheKey { prefixlen, family, pad, addr }),
        layout!("mg_ipcache_value", IpcacheValue { identity, node_id }),
        layout!("mg_policy_key", PolicyKey { prefixlen, subject, peer, direction, protocol, port }),
        layout!("mg_policy_value", PolicyValue { action, pad, cookie }),
        layout!("mg_subject_key", SubjectKey { identity, direction }),
        layout!("mg_subject_value", SubjectValue { flags }),
        layout!("mg_auth_key", AuthKey { local_identity, remote_identity, remote_node, pad }),
        layout!("mg_auth_value", AuthValue { expires_boot_ns }),
        layout!("mg_ct_key", CtKey { local_addr, remote_addr, local_port, remote_port, protocol, family, pad }),
        layout!("mg_ct_entry", CtEntry { expires, policy_revision, peer_identity, peer_node, policy_port, flags }),
        layout!("mg_frag_key", FragKey { saddr, daddr, id, protocol, family, pad }),
        layout!("mg_frag_value", FragValue { created, sport, dport, policy_port, protocol, pad }),
        layout!(
            "mg_event",
            RawEvent {
                timestamp_ns,
                r#type,
                reason,
                direction,
                family,
                protocol,
                pad,
                ifindex,
                subject_identity,
                peer_identity,
                peer_node,
                cookie,
                saddr,
                daddr,
                sport,
                dport,
                pad2
            }
        ),
        layout!("mg_auth_signal", AuthSignal { ev, frame_len, pad, frame }),
        layout!("mg_counter", Counter { packets, bytes }),
        layout!("mg_clock", Clock { jiffies }),
    ];
    for (name, size, fields) in mirrors {
        let c = btf.structs.get(name).unwrap_or_else(|| panic!("struct {name} is not in abi.o's BTF: instantiate it in bpf/abi.c"));
        assert_eq!(size, c.size as usize, "size of struct {name}");
        let c_fields: Vec<(&str, usize)> = c.members.iter().map(|(n, o)| (n.as_str(), *o as usize)).collect();
        assert_eq!(fields, c_fields, "fields of struct {name} (name, offset), Rust vs C");
    }
}

fn c_enum(btf: &Btf, name: &str) -> BTreeMap<String, i64> {
    btf.enums.get(name).unwrap_or_else(|| panic!("enum {name} is not in abi.o's BTF")).iter().cloned().collect()
}

#[test]
fn drop_and_forward_reasons_match_the_c_list() {
    let btf = btf();
    let mut drops = c_enum(&btf, "mg_drop_reason");
    assert_eq!(drops.remove("MG_DROP_REASON_MAX"), Some(i64::from(abi::MG_DROP_REASON_MAX)));
    let rust: BTreeMap<String, i64> = DropReason::ALL.iter().map(|(r, n)| (n.to_string(), i64::from(r.code()))).collect();
    assert_eq!(rust, drops, "DropReason vs bpf/lib/drop_reasons.h");
    let fwd = c_enum(&btf, "mg_fwd_reason");
    let rust: BTreeMap<String, i64> = ForwardReason::ALL.iter().map(|(r, n)| (n.to_string(), i64::from(r.code()))).collect();
    assert_eq!(rust, fwd, "ForwardReason vs bpf/lib/drop_reasons.h");
    for (r, name) in DropReason::ALL {
        assert_eq!(r.c_name(), *name);
        assert_eq!(DropReason::from_code(r.code()), Some(*r));
    }
}

#[test]
fn constants_match_the_c_enums() {
    let btf = btf();
    let checks: Vec<(&str, Vec<(&str, i64)>)> = vec![
        ("mg_family", vec![("MG_FAMILY_IPV4", MG_FAMILY_IPV4.into()), ("MG_FAMILY_IPV6", MG_FAMILY_IPV6.into())]),
        (
            "mg_direction",
            vec![("MG_DIR_INGRESS", MG_DIR_INGRESS.into()), ("MG_DIR_EGRESS", MG_DIR_EGRESS.into()), ("MG_DIR_MAX", MG_DIR_MAX as i64)],
        ),
        (
            "mg_reserved_identity",
            vec![
                ("MG_IDENTITY_ANY", MG_IDENTITY_ANY.into()),
                ("MG_IDENTITY_HOST", MG_IDENTITY_HOST.into()),
                ("MG_IDENTITY_WORLD", MG_IDENTITY_WORLD.into()),
                ("MG_IDENTITY_MIN_WORKLOAD", MG_IDENTITY_MIN_WORKLOAD.into()),
            ],
        ),
        (
            "mg_ct_timeout",
            vec![
                ("MG_CT_TIMEOUT_TCP_SYN", MG_CT_TIMEOUT_TCP_SYN as i64),
                ("MG_CT_TIMEOUT_TCP_EST", MG_CT_TIMEOUT_TCP_EST as i64),
                ("MG_CT_TIMEOUT_TCP_CLOSE", MG_CT_TIMEOUT_TCP_CLOSE as i64),
                ("MG_CT_TIMEOUT_UDP", MG_CT_TIMEOUT_UDP as i64),
                ("MG_CT_TIMEOUT_SCTP", MG_CT_TIMEOUT_SCTP as i64),
                ("MG_CT_TIMEOUT_ICMP", MG_CT_TIMEOUT_ICMP as i64),
                ("MG_CT_TIMEOUT_OTHER", MG_CT_TIMEOUT_OTHER as i64),
                ("MG_CT_TIMEOUT_MAX", MG_CT_TIMEOUT_MAX as i64),
            ],
        ),
        ("mg_config_flags", vec![("MG_CFG_F_READY", MG_CFG_F_READY.into())]),
        (
            "mg_subject_flags",
            vec![
                ("MG_SUBJ_F_DEFAULT_DENY", MG_SUBJ_F_DEFAULT_DENY.into()),
                ("MG_SUBJ_F_EXACT_PEERS", MG_SUBJ_F_EXACT_PEERS.into()),
                ("MG_SUBJ_F_ANY_PEER", MG_SUBJ_F_ANY_PEER.into()),
            ],
        ),
        (
            "mg_endpoint_flags",
            vec![
                ("MG_EP_F_VALID", MG_EP_F_VALID.into()),
                ("MG_EP_F_HAS_IPV4", MG_EP_F_HAS_IPV4.into()),
                ("MG_EP_F_HAS_IPV6", MG_EP_F_HAS_IPV6.into()),
            ],
        ),
        (
            "mg_ct_flags",
            vec![
                ("MG_CT_F_EGRESS", MG_CT_F_EGRESS.into()),
                ("MG_CT_F_REPLY_SEEN", MG_CT_F_REPLY_SEEN.into()),
                ("MG_CT_F_CLOSING", MG_CT_F_CLOSING.into()),
                ("MG_CT_F_AUTH", MG_CT_F_AUTH.into()),
            ],
        ),
        (
            "mg_action",
            vec![
                ("MG_ACTION_NONE", MG_ACTION_NONE.into()),
                ("MG_ACTION_ALLOW", MG_ACTION_ALLOW.into()),
                ("MG_ACTION_AUTH", MG_ACTION_AUTH.into()),
                ("MG_ACTION_DENY", MG_ACTION_DENY.into()),
            ],
        ),
        (
            "mg_event_type",
            vec![
                ("MG_EVENT_DROP", MG_EVENT_DROP.into()),
                ("MG_EVENT_AUTH_REQUIRED", MG_EVENT_AUTH_REQUIRED.into()),
                ("MG_EVENT_FLOW", MG_EVENT_FLOW.into()),
            ],
        ),
    ];
    for (name, rust) in checks {
        let rust: BTreeMap<String, i64> = rust.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        assert_eq!(rust, c_enum(&btf, name), "enum {name}, Rust vs C");
    }
}

#[test]
fn every_pinned_map_is_in_the_datapath_object() {
    let names = map_symbols(objects::DATAPATH);
    for m in PINNED_MAPS {
        assert!(names.contains(&m.to_string()), "map {m} missing from meshguard.o ({names:?})");
        assert!(m.len() < 16, "map name {m} is longer than the kernel's 15 characters");
    }
    assert_eq!(names.len(), PINNED_MAPS.len(), "meshguard.o has maps abi::PINNED_MAPS does not list: {names:?}");
}

fn map_symbols(elf: &[u8]) -> Vec<String> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let file = object::File::parse(elf).unwrap();
    let maps = file.section_by_name(".maps").unwrap().index();
    file.symbols().filter(|s| s.section_index() == Some(maps)).map(|s| s.name().unwrap().to_owned()).collect()
}
