/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Policy: (subject identity, peer identity, direction, protocol, port or
 * range) -> allow / auth-required / deny.
 *
 * The map is one LPM trie. The key data is subject(32) peer(32)
 * direction(8) protocol(8) port(16, network order), 96 bits:
 *   prefixlen 72      any protocol, any port
 *   prefixlen 80      one protocol, any port
 *   prefixlen 80 + n  one protocol, ports sharing their first n bits
 * A port range becomes at most 30 such prefixes (user space splits it);
 * an ICMP type is the port's first 8 bits (port = type<<8 | code).
 * Identity wildcards (0) cannot sit in a trie prefix, so a packet takes at
 * most four lookups: (subject, peer), (subject, any), (any, peer),
 * (any, any), each skipped when the subject map (or, for the any-subject,
 * the config) says that kind of entry does not exist.
 *
 * Precedence: every entry that matches counts, and the most restrictive
 * action wins: DENY > AUTH (auth-required) > ALLOW. Within one lookup the
 * longest prefix answers, so user space stores in every prefix the most
 * restrictive action of all entries covering it (the Rust policy compiler
 * does this); across lookups the datapath takes the maximum. No match:
 * deny when the subject is default-deny in that direction (selected by a
 * policy), allow otherwise.
 */
#ifndef MG_POLICY_H
#define MG_POLICY_H

#include "common.h"
#include "config.h"

#ifndef MG_POLICY_MAX
#define MG_POLICY_MAX 65536
#endif
#ifndef MG_SUBJECT_MAX
#define MG_SUBJECT_MAX 16384
#endif

#define MG_POLICY_PREFIX_ANY_PROTO 72
#define MG_POLICY_PREFIX_ANY_PORT 80
#define MG_POLICY_PREFIX_FULL 96

enum mg_action {
	MG_ACTION_NONE = 0,   /* no entry matched */
	MG_ACTION_ALLOW = 1,
	MG_ACTION_AUTH = 2,   /* allow while the auth map holds a live entry */
	MG_ACTION_DENY = 3,
};

struct mg_policy_key {
	__u32 prefixlen;
	__u32 subject;    /* 0: any */
	__u32 peer;       /* 0: any */
	__u8 direction;   /* MG_DIR_* */
	__u8 protocol;
	__be16 port;
};

struct mg_policy_value {
	__u8 action;      /* MG_ACTION_* */
	__u8 pad[3];
	__u32 cookie;     /* user space's rule id, reported in drop events */
};

struct mg_subject_key {
	__u32 identity;
	__u32 direction;
};

struct mg_subject_value {
	__u32 flags;      /* MG_SUBJ_F_* */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct mg_policy_key);
	__type(value, struct mg_policy_value);
	__uint(max_entries, MG_POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct mg_subject_key);
	__type(value, struct mg_subject_value);
	__uint(max_entries, MG_SUBJECT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_subjects SEC(".maps");

struct mg_policy_result {
	__u8 action;      /* MG_ACTION_*, after default-deny is applied: NONE means open */
	__u8 default_deny;
	__u32 cookie;
};

static __always_inline void mg_policy_try(struct mg_policy_key *key, __u32 subject, __u32 peer,
					  struct mg_policy_result *res)
{
	struct mg_policy_value *v;

	key->subject = subject;
	key->peer = peer;
	v = bpf_map_lookup_elem(&mg_policy, key);
	if (v && v->action > res->action) {
		res->action = v->action;
		res->cookie = v->cookie;
	}
}

static __always_inline struct mg_policy_result
mg_policy_eval(const struct mg_config *cfg, __u32 subject, __u32 peer, __u8 dir, __u8 proto,
	       __be16 port)
{
	struct mg_policy_result res = {};
	struct mg_policy_key key = {
		.prefixlen = MG_POLICY_PREFIX_FULL,
		.direction = dir,
		.protocol = proto,
		.port = port,
	};
	struct mg_subject_key skey = { .identity = subject, .direction = dir };
	struct mg_subject_value *s = bpf_map_lookup_elem(&mg_subjects, &skey);
	__u32 sflags = s ? s->flags : 0;
	__u32 aflags = dir == MG_DIR_INGRESS ? cfg->any_subject_flags[MG_DIR_INGRESS]
					    : cfg->any_subject_flags[MG_DIR_EGRESS];

	if (sflags & MG_SUBJ_F_EXACT_PEERS)
		mg_policy_try(&key, subject, peer, &res);
	if (res.action != MG_ACTION_DENY && (sflags & MG_SUBJ_F_ANY_PEER))
		mg_policy_try(&key, subject, MG_IDENTITY_ANY, &res);
	if (res.action != MG_ACTION_DENY && (aflags & MG_SUBJ_F_EXACT_PEERS))
		mg_policy_try(&key, MG_IDENTITY_ANY, peer, &res);
	if (res.action != MG_ACTION_DENY && (aflags & MG_SUBJ_F_ANY_PEER))
		mg_policy_try(&key, MG_IDENTITY_ANY, MG_IDENTITY_ANY, &res);
	res.default_deny = ((sflags | aflags) & MG_SUBJ_F_DEFAULT_DENY) != 0;
	return res;
}

#endif /* MG_POLICY_H */
