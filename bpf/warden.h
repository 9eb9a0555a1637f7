/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Every structure shared between Warden's eBPF programs (warden.bpf.c) and the Rust datapath
 * crate (shared/datapath, module `abi`). The Rust side mirrors each struct with #[repr(C)] and
 * asserts its size, so keep them byte-for-byte identical and change both together.
 *
 * Layout rules, so that the kernel and Rust agree without guessing:
 *  - no implicit padding: every hole is an explicit `pad` field that writers set to zero
 *    (hash keys are compared bytewise, so a non-zero pad byte would make a different key);
 *  - addresses are 16 bytes in network order; IPv4 is stored v4-mapped (::ffff:a.b.c.d), so one
 *    key type and one LPM trie serve both families, and a dual-stack socket connecting to a
 *    v4-mapped address matches the IPv4 entries;
 *  - ports are in HOST byte order in every map (the programs convert), 0 meaning "any" where a
 *    wildcard makes sense;
 *  - times written by the kernel are CLOCK_BOOTTIME nanoseconds (bpf_ktime_get_boot_ns); times
 *    written by userspace (fqdn_allow expiry) are unix seconds and never read by the kernel.
 *
 * When a layout changes, bump WARDEN_LAYOUT_VERSION (the pin folder is <bpffs>/v<N>/), because
 * a loader reusing a pinned map does not check that its key and value sizes still match.
 */
#ifndef WARDEN_H
#define WARDEN_H

#include <linux/types.h>

#define WARDEN_LAYOUT_VERSION 1

/* endpoints: HASH cgroup id (u64) -> struct warden_endpoint */
#define WARDEN_EP_ENFORCED 1
#define WARDEN_EP_REDIRECT_DNS 2

struct warden_endpoint {
	__u32 endpoint_id;
	__u32 flags; /* WARDEN_EP_* */
};

/* dns_targets: HASH endpoint id (u32) -> struct warden_dns_target. A port of 0 means "no target
 * for this family": port-53 traffic of that family is then not redirected. */
struct warden_dns_target {
	__u8 addr4[4]; /* network order */
	__u16 port4;
	__u16 pad0;
	__u8 addr6[16]; /* network order */
	__u16 port6;
	__u16 pad1;
};

/* A socket address: sock_orig values and the original destination in redirect records. */
#define WARDEN_AF_INET 2   /* AF_INET */
#define WARDEN_AF_INET6 10 /* AF_INET6 */

struct warden_sockaddr {
	__u8 addr[16]; /* v4-mapped for IPv4 */
	__u16 port;
	__u8 family; /* WARDEN_AF_*: the family the application used */
	__u8 pad;
};

/* redirect_records: LRU_HASH struct warden_client_key -> struct warden_redirect_record */
struct warden_client_key {
	__u8 addr[16]; /* the client's source address as the proxy sees it (v4-mapped for IPv4) */
	__u16 port;
	__u8 proto; /* IPPROTO_UDP / IPPROTO_TCP */
	__u8 pad;
};

struct warden_redirect_record {
	__u64 cgroup_id; /* the enrolled cgroup (the socket's own or its nearest enrolled ancestor) */
	__u64 time_ns;   /* boot ns of the packet that wrote the record (an unchanged record is
			  * rewritten once a second at most; its slot's stamp is the recent one) */
	struct warden_sockaddr orig;
	__u32 pad;
};

/* redirect_slots: ARRAY (BPF_F_MMAPABLE) of WARDEN_REDIRECT_SLOTS struct warden_redirect_slot,
 * the latest redirect record of each client key that hashes there, which the proxy reads from
 * its own memory instead of one bpf() lookup of redirect_records per query. The slot of a key:
 *   h = 0; for each of the address's four 32-bit words w (native order): h = (h ^ w) * GOLDEN;
 *   h = (h ^ (port | proto << 16)) * GOLDEN; slot = h >> (32 - WARDEN_REDIRECT_SLOT_BITS)
 * (32-bit wrapping arithmetic). A sequence lock guards each slot: a writer takes it from even to
 * odd with a compare-and-swap (or leaves the slot alone when another writer is inside: the LRU
 * map still has the record), writes, and makes it even again; a reader copies the slot between
 * two equal even sequence numbers. Sequence 0 means the slot was never written. A writer may
 * leave a slot alone that already holds the same key and record stamped less than
 * WARDEN_REDIRECT_REFRESH_NS ago, so a record's stamp in its slot can be that much older than
 * the client's latest packet.
 * The map's name is the protocol's version: a change to the hash, the lock or the layout, even
 * one that keeps the sizes, takes a new name (redirect_slots2), so that a reader of another
 * build never reads slots it does not understand. */
#define WARDEN_REDIRECT_SLOT_BITS 14
#define WARDEN_REDIRECT_SLOTS (1 << WARDEN_REDIRECT_SLOT_BITS)
#define WARDEN_REDIRECT_GOLDEN 0x9E3779B1u
#define WARDEN_REDIRECT_REFRESH_NS 100000000ULL /* 100 ms; readers allow 1 s */

struct warden_redirect_slot {
	__u64 seq;
	/* struct warden_client_key, then the record's orig port and family */
	__u8 addr[16];
	__u16 port;
	__u8 proto;
	__u8 pad0;
	__u16 orig_port;
	__u8 orig_family;
	__u8 pad1;
	/* struct warden_redirect_record's other fields */
	__u64 cgroup_id;
	__u64 time_ns;
	__u8 orig_addr[16];
};

/* The reader (shared/datapath/src/slots.rs) reads the slot as eight 64-bit words. */
_Static_assert(sizeof(struct warden_redirect_slot) == 64, "redirect slot size");
_Static_assert(__builtin_offsetof(struct warden_redirect_slot, addr) == 8, "slot key");
_Static_assert(__builtin_offsetof(struct warden_redirect_slot, port) == 24, "slot ports word");
_Static_assert(__builtin_offsetof(struct warden_redirect_slot, orig_port) == 28, "slot orig port");
_Static_assert(__builtin_offsetof(struct warden_redirect_slot, cgroup_id) == 32, "slot cgroup");
_Static_assert(__builtin_offsetof(struct warden_redirect_slot, time_ns) == 40, "slot time");
_Static_assert(__builtin_offsetof(struct warden_redirect_slot, orig_addr) == 48, "slot orig addr");

/* fqdn_allow: HASH struct warden_fqdn_key -> struct warden_fqdn_value. The kernel checks
 * presence only; the value is for userspace garbage collection. */
struct warden_fqdn_key {
	__u32 endpoint_id;
	__u8 proto; /* IPPROTO_TCP/UDP/..., 0 = any */
	__u8 pad;
	__u16 port; /* 0 = any */
	__u8 addr[16];
};

struct warden_fqdn_value {
	__u64 expires_at; /* unix seconds */
	__u32 flags;      /* reserved, 0 */
	__u32 pad;
};

/* cidr_allow: LPM_TRIE struct warden_cidr_key -> struct warden_cidr_value. prefixlen counts the
 * 32 bits of endpoint_id (always fully matched) plus the address prefix (IPv4 prefixes add 96
 * for the ::ffff: part). */
#define WARDEN_CIDR_MAX_RULES 8
#define WARDEN_CIDR_MAX_NESTING 8

struct warden_cidr_key {
	__u32 prefixlen;
	__u32 endpoint_id;
	__u8 addr[16];
};

struct warden_port_rule {
	__u8 proto; /* 0 = any */
	__u8 pad0;
	__u16 first; /* inclusive, host order */
	__u16 last;  /* inclusive; 0..65535 with proto 0 = everything, ICMP included */
	__u16 pad1;
};

struct warden_cidr_value {
	/* The entry's own key prefixlen: the trie lookup does not say which prefix matched, and
	 * the program needs it to continue with the next shorter (enclosing) prefix. 0 = stop
	 * here: set on the IPv4 /0 entry (::ffff:0:0/96) and on a rule-less "barrier" entry at the
	 * same key, so that IPv4 destinations never fall through into IPv6 prefixes such as ::/0
	 * that happen to contain the v4-mapped range. */
	__u32 prefixlen;
	__u32 count; /* rules[0..count) are valid */
	struct warden_port_rule rules[WARDEN_CIDR_MAX_RULES];
};

/* last_seen: LRU_HASH struct warden_last_seen_key -> __u64 boot ns of the last packet that
 * fqdn_allow let through (refreshed at most once a second per key). */
struct warden_last_seen_key {
	__u32 endpoint_id;
	__u32 pad;
	__u8 addr[16];
};

/* events: RINGBUF of struct warden_drop_event */
#define WARDEN_DROP_CONNECT 1  /* connect() denied by policy (EPERM) */
#define WARDEN_DROP_SENDMSG 2  /* sendmsg() with a destination denied by policy (EPERM) */
#define WARDEN_DROP_EGRESS 3   /* packet denied by policy in cgroup_skb/egress */
#define WARDEN_DROP_IPV6_EXT 4 /* IPv6 packet with extension headers to a not wholly allowed dst */
#define WARDEN_DROP_FRAGMENT 5 /* IPv4 non-first fragment to a not wholly allowed dst */
#define WARDEN_DROP_NO_PORTS 6 /* ICMP or another port-less protocol to a not wholly allowed dst */
#define WARDEN_DROP_MALFORMED 7 /* headers that could not be parsed */

struct warden_drop_event {
	__u64 time_ns; /* boot ns */
	__u64 cgroup_id;
	__u32 endpoint_id;
	__u8 family; /* WARDEN_AF_* */
	__u8 proto;
	__u8 reason; /* WARDEN_DROP_* */
	__u8 pad0;
	__u8 src[16]; /* zero when the hook does not know it yet (connect, sendmsg) */
	__u8 dst[16];
	__u16 src_port;
	__u16 dst_port;
	__u32 pad1;
};

/* reuseport_config: ARRAY[1] of struct warden_reuseport_config.
 * reuseport_sockets: REUSEPORT_SOCKARRAY of WARDEN_REUSEPORT_SLOTS; slot = 4 * instance +
 * 2 * (IPv6) + (0 for the first UDP socket, 1 for the TCP listener), so one map serves the four
 * reuseport groups of the DNS port (UDP and TCP, IPv4 and IPv6). Instance 0 is the agent,
 * 1 the standalone proxy. */
#define WARDEN_REUSEPORT_INSTANCES 2
#define WARDEN_REUSEPORT_SLOTS (4 * WARDEN_REUSEPORT_INSTANCES)

/* reuseport_spread: REUSEPORT_SOCKARRAY of WARDEN_REUSEPORT_SLOTS * WARDEN_REUSEPORT_SPREAD;
 * an instance's sockets of one slot beyond the one reuseport_sockets holds, on the same
 * address (dns.listen_sockets UDP sockets per address; a further address of the family is
 * another reuseport group, left to the kernel's hash) at slot * WARDEN_REUSEPORT_SPREAD + i
 * (a socket can be in one array slot only). reuseport_spread_count: ARRAY of
 * WARDEN_REUSEPORT_SLOTS __u32, how many there are: the program spreads the slot's clients
 * over its own socket and those by the kernel's hash of their addresses. Added beside
 * reuseport_sockets, which programs and processes that know no spread use alone. 64: the
 * most dns.listen_sockets allows, less the slot's own. */
#define WARDEN_REUSEPORT_SPREAD 64

struct warden_reuseport_config {
	__u32 preferred; /* instance tried first */
	__u32 enabled;   /* 0: no preference, let the kernel hash */
};

/* node_config: ARRAY[1] of struct warden_node_config, written by the loader before it
 * attaches the programs. */
struct warden_node_config {
	/* The network namespace the proxies run in (SO_NETNS_COOKIE of the loader's socket): a
	 * loopback or unspecified destination is that namespace's own only for sockets in it,
	 * so port 53 there is redirected only for them. 0: not known (a kernel without
	 * SO_NETNS_COOKIE), and every such destination is redirected. */
	__u64 proxy_netns_cookie;
};

#endif /* WARDEN_H */
