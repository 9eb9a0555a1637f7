// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Warden's eBPF datapath: transparent DNS redirect and egress enforcement for workloads
 * identified by cgroup.
 *
 *   cgroup/connect4|6, cgroup/sendmsg4|6   port-53 destinations of REDIRECT_DNS endpoints go to
 *                                          the endpoint's DNS target (the proxy); the original
 *                                          destination is kept in the socket's storage. For
 *                                          ENFORCED endpoints, a destination the policy does not
 *                                          allow is refused at once (EPERM) with a drop event.
 *   cgroup/recvmsg4|6, cgroup/getpeername4|6
 *                                          put the original server back where the application
 *                                          would otherwise see the proxy.
 *   cgroup_skb/egress                      enforcement of every packet (the authority: socket
 *                                          hooks only make failures immediate), and re-keying of
 *                                          the redirect by client (addr, port, proto) for the proxy.
 *   cgroup/bind4|6, cgroup_skb/ingress     UDP sockets bound to a port of the workload's own are
 *                                          services: a peer's datagram lets the socket answer it
 *                                          for a minute.
 *   sockops                                marks TCP connections a peer opened to the workload
 *                                          (accepted sockets): egress lets their packets, replies,
 *                                          through, as a stateful firewall would.
 *   sk_reuseport                           picks the preferred live proxy, and one of its DNS
 *                                          sockets by the client's hash.
 *
 * Endpoints are found by cgroup id: the socket's own cgroup, else its nearest enrolled
 * ancestor, so processes in sub-cgroups of an enrolled cgroup (containers inside a pod cgroup,
 * or a workload creating its own child cgroup) cannot step outside their policy.
 *
 * Structures shared with Rust live in warden.h; map names are the ABI the Rust crate opens.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "warden.h"

char LICENSE[] SEC("license") = "GPL";

#define DNS_PORT 53
#define MAX_CGROUP_LEVELS 16

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

/* ------------------------------------------------------------------------------------------ */
/* Maps. Every map is pinned by name under <bpffs>/v<WARDEN_LAYOUT_VERSION>/.                  */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct warden_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct warden_dns_target);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_targets SEC(".maps");

/* Internal to the programs (recvmsg/getpeername need the redirect target too, to rewrite only
 * what came from it); the proxy reads redirect_records instead. The socket's own storage, freed
 * with it: nothing another workload does can take it away (an LRU shared by every socket, as
 * sock_orig below was, could be emptied for all by one workload churning sockets, and a
 * long-lived resolver socket then saw its answers come from the proxy). Pinned, so that a
 * reloaded program still restores the sockets redirected before. */
struct warden_sock_orig {
	struct warden_sockaddr orig;
	struct warden_sockaddr target;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for socket storage */
	__type(key, int);
	__type(value, struct warden_sock_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sock_origins SEC(".maps");

/* What releases before sock_origins kept, by socket cookie. Still written beside the storage,
 * and read: for sockets such a release redirected, which outlive an upgrade; for a rollback to
 * one, which reads nothing else; and for a socket such a release redirected anew after a
 * rollback, when upgraded again (see sock_orig_of). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct warden_sock_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sock_orig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct warden_client_key);
	__type(value, struct warden_redirect_record);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} redirect_records SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WARDEN_REDIRECT_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct warden_redirect_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} redirect_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	/* Not preallocated: the map is large and usually sparse. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct warden_fqdn_key);
	__type(value, struct warden_fqdn_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fqdn_allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct warden_cidr_key);
	__type(value, struct warden_cidr_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cidr_allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct warden_last_seen_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} last_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, WARDEN_REUSEPORT_SLOTS);
	__type(key, __u32);
	__type(value, __u32); /* a socket fd on update */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} reuseport_sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct warden_reuseport_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} reuseport_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, WARDEN_REUSEPORT_SLOTS * WARDEN_REUSEPORT_SPREAD);
	__type(key, __u32);
	__type(value, __u32); /* a socket fd on update */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} reuseport_spread SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WARDEN_REUSEPORT_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} reuseport_spread_count SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct warden_node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_config SEC(".maps");

/* TCP connections a peer opened to the workload, marked with that peer when the kernel
 * completes the passive open: packets to it are replies, which egress policy does not
 * restrict (Cilium's egress policy is stateful too). The mark is the socket's own storage,
 * freed with it, and pinned so that a reloaded program still finds the marks of connections
 * accepted before. It names the peer, and an active connect removes it, so a socket taken over
 * for a connection of the workload's own (TCP can disconnect and connect again) is checked
 * like any other. */
struct warden_inbound {
	__u8 peer[16];
	__u16 port; /* host order */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for socket storage */
	__type(key, int);
	__type(value, struct warden_inbound);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_conns SEC(".maps");

/* UDP sockets bound to a port of their owner's choosing: services (a DNS or QUIC server, a
 * syslog receiver), which answer whoever writes to them. Marked by the bind hooks whoever
 * binds (a workload often binds before its cgroup is enrolled); only those of enforced
 * endpoints open reply windows. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for socket storage */
	__type(key, int);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} udp_services SEC(".maps");

/* Who wrote to an enforced endpoint's UDP service socket, and when last: that socket may
 * answer that peer for WARDEN_UDP_REPLY_NS after, as a connection tracker's UDP entry would
 * let it. Keyed by the socket, not its port: a port names different sockets in different
 * network namespaces (a workload can make one of its own), and NAT in front of a service
 * changes the port between what arrives and what leaves. */
struct warden_udp_peer {
	__u64 cookie; /* the service socket */
	__u8 peer[16];
	__u16 peer_port; /* host order */
	__u16 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct warden_udp_peer);
	__type(value, __u64); /* boot-time ns of the peer's last datagram */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} udp_peers SEC(".maps");

#define WARDEN_UDP_REPLY_NS (60ULL * 1000000000ULL)
/* lo, in every network namespace. */
#define WARDEN_LOOPBACK_IFINDEX 1

/* ------------------------------------------------------------------------------------------ */
/* Addresses                                                                                  */

struct addr16 {
	__u8 b[16];
};

static __always_inline void v4_mapped(struct addr16 *out, __u32 ip4_be)
{
	__builtin_memset(out->b, 0, 10);
	out->b[10] = 0xff;
	out->b[11] = 0xff;
	__builtin_memcpy(&out->b[12], &ip4_be, 4);
}

static __always_inline int is_v4_mapped(const struct addr16 *a)
{
	__u64 hi;
	__u32 mid;

	__builtin_memcpy(&hi, &a->b[0], 8);
	__builtin_memcpy(&mid, &a->b[8], 4);
	return hi == 0 && mid == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_eq(const __u8 *x, const __u8 *y)
{
	__u64 x0, x1, y0, y1;

	__builtin_memcpy(&x0, x, 8);
	__builtin_memcpy(&x1, x + 8, 8);
	__builtin_memcpy(&y0, y, 8);
	__builtin_memcpy(&y1, y + 8, 8);
	return x0 == y0 && x1 == y1;
}

static __always_inline int sockaddr_eq(const struct warden_sockaddr *x,
				       const struct warden_sockaddr *y)
{
	return addr_eq(x->addr, y->addr) && x->port == y->port && x->family == y->family;
}

static __always_inline int sock_orig_eq(const struct warden_sock_orig *x,
					const struct warden_sock_orig *y)
{
	return sockaddr_eq(&x->orig, &y->orig) && sockaddr_eq(&x->target, &y->target);
}

/* A socket's original server: its own storage, unless the cookie's entry says otherwise. This
 * release writes both alike (an entry it cannot write it removes); they differ where an earlier
 * release, rolled back to, wrote the entry since (the storage it does not know kept what this
 * one wrote before), or where the storage has nothing, as for a socket an earlier release
 * redirected: the entry is the newer then. (Two threads sending one socket to two servers at
 * once can leave them apart too, each naming one of the two.) One another socket's churn
 * evicted leaves the storage alone. */
static __always_inline struct warden_sock_orig *sock_orig_of(struct bpf_sock *sk, __u64 cookie)
{
	struct warden_sock_orig *so = NULL;
	struct warden_sock_orig *by_cookie = bpf_map_lookup_elem(&sock_orig, &cookie);

	if (sk)
		so = bpf_sk_storage_get(&sock_origins, sk, 0, 0);
	if (by_cookie && (!so || !sock_orig_eq(so, by_cookie)))
		return by_cookie;
	return so;
}

/*
 * Loopback always passes: it is the loopback of the network namespace the workload itself runs
 * in (a pod's own lo, or the host's for host-namespace workloads), so it never leaves that
 * namespace, and local resolvers, sidecars and the host-namespace DNS target live there.
 */
static __always_inline int is_loopback(const struct addr16 *a)
{
	__u64 hi, lo;

	__builtin_memcpy(&hi, &a->b[0], 8);
	__builtin_memcpy(&lo, &a->b[8], 8);
	if (hi == 0 && lo == bpf_cpu_to_be64(1))
		return 1; /* ::1 */
	return is_v4_mapped(a) && a->b[12] == 127;
}

/* 0.0.0.0 or ::, which connect and sendmsg take for the local host: local for the socket
 * hooks only (a packet with such a destination, which only a raw socket writes, is not). */
static __always_inline int is_unspecified(const struct addr16 *a)
{
	__u64 hi, lo;

	__builtin_memcpy(&hi, &a->b[0], 8);
	__builtin_memcpy(&lo, &a->b[8], 8);
	if (hi == 0 && lo == 0)
		return 1;
	return is_v4_mapped(a) && a->b[12] == 0 && a->b[13] == 0 && a->b[14] == 0 &&
	       a->b[15] == 0;
}

/* Whether the service socket `cookie` heard from (peer, peer_port) within the reply window. */
static __always_inline int is_udp_reply(__u64 cookie, const struct addr16 *peer, __u16 peer_port)
{
	struct warden_udp_peer key = {};
	__u64 *seen;

	key.cookie = cookie;
	key.peer_port = peer_port;
	__builtin_memcpy(key.peer, peer->b, 16);
	seen = bpf_map_lookup_elem(&udp_peers, &key);
	return seen && bpf_ktime_get_boot_ns() - *seen < WARDEN_UDP_REPLY_NS;
}

/* ------------------------------------------------------------------------------------------ */
/* Endpoints                                                                                  */

/* The socket's own cgroup if enrolled, else its deepest enrolled ancestor. The exact lookup
 * comes first because enrolled cgroups are the common case. */
static __always_inline struct warden_endpoint *endpoint_of_current(__u64 *cgroup_id)
{
	__u64 id = bpf_get_current_cgroup_id();
	struct warden_endpoint *ep = bpf_map_lookup_elem(&endpoints, &id);
	struct warden_endpoint *found = NULL;

	if (ep) {
		*cgroup_id = id;
		return ep;
	}
	for (int level = 1; level < MAX_CGROUP_LEVELS; level++) {
		__u64 anc = bpf_get_current_ancestor_cgroup_id(level);

		if (anc == 0 || anc == id)
			break;
		ep = bpf_map_lookup_elem(&endpoints, &anc);
		if (ep) {
			found = ep;
			*cgroup_id = anc;
		}
	}
	return found;
}

static __always_inline struct warden_endpoint *endpoint_of_skb(struct __sk_buff *skb,
							      __u64 *cgroup_id)
{
	__u64 id = bpf_skb_cgroup_id(skb);
	struct warden_endpoint *ep = bpf_map_lookup_elem(&endpoints, &id);
	struct warden_endpoint *found = NULL;

	if (ep) {
		*cgroup_id = id;
		return ep;
	}
	for (int level = 1; level < MAX_CGROUP_LEVELS; level++) {
		__u64 anc = bpf_skb_ancestor_cgroup_id(skb, level);

		if (anc == 0 || anc == id)
			break;
		ep = bpf_map_lookup_elem(&endpoints, &anc);
		if (ep) {
			found = ep;
			*cgroup_id = anc;
		}
	}
	return found;
}

/* ------------------------------------------------------------------------------------------ */
/* Policy                                                                                     */

/* Exact keys only, most specific first: {proto, port}, {proto, any}, {any, port}, {any, any}.
 * Independent keys let any writer add or extend an entry without touching another's. */
static __always_inline int fqdn_allowed(__u32 endpoint_id, const struct addr16 *dst, __u8 proto,
					__u16 port)
{
	struct warden_fqdn_key k = {};

	k.endpoint_id = endpoint_id;
	__builtin_memcpy(k.addr, dst->b, 16);

	k.proto = proto;
	k.port = port;
	if (port && bpf_map_lookup_elem(&fqdn_allow, &k))
		return 1;
	k.port = 0;
	if (proto && bpf_map_lookup_elem(&fqdn_allow, &k))
		return 1;
	k.proto = 0;
	k.port = port;
	if (port && bpf_map_lookup_elem(&fqdn_allow, &k))
		return 1;
	k.port = 0;
	return bpf_map_lookup_elem(&fqdn_allow, &k) != NULL;
}

/* l4: the packet has ports. A packet without them (ICMP, fragments, unknown protocols) is only
 * allowed by a rule that allows every port of its protocol (or of any protocol). */
static __always_inline int rules_match(const struct warden_cidr_value *v, __u8 proto, __u16 port,
				       int l4)
{
	for (int i = 0; i < WARDEN_CIDR_MAX_RULES; i++) {
		const struct warden_port_rule *r = &v->rules[i];

		if (i >= v->count)
			break;
		if (r->proto != 0 && r->proto != proto)
			continue;
		if (l4 && port >= r->first && port <= r->last)
			return 1;
		if (!l4 && r->first == 0 && r->last == 65535)
			return 1;
	}
	return 0;
}

/* Longest-prefix match, then the enclosing prefixes in turn (up to WARDEN_CIDR_MAX_NESTING):
 * a packet is allowed when ANY CIDR rule containing its destination allows its port, so
 * userspace need not merge the rules of nested prefixes. Deeper nesting is ignored, which can
 * only deny more. */
static __always_inline int cidr_allowed(__u32 endpoint_id, const struct addr16 *dst, __u8 proto,
					__u16 port, int l4)
{
	struct warden_cidr_key k = {};

	k.prefixlen = 32 + 128;
	k.endpoint_id = endpoint_id;
	__builtin_memcpy(k.addr, dst->b, 16);

	for (int depth = 0; depth < WARDEN_CIDR_MAX_NESTING; depth++) {
		struct warden_cidr_value *v = bpf_map_lookup_elem(&cidr_allow, &k);
		__u32 plen;

		if (!v)
			return 0;
		if (rules_match(v, proto, port, l4))
			return 1;
		plen = v->prefixlen;
		/* 0: stop (see warden.h); <= 32 would leave the endpoint part; a length above the
		 * current one cannot progress. */
		if (plen <= 32 || plen > k.prefixlen)
			return 0;
		k.prefixlen = plen - 1;
	}
	return 0;
}

/* The endpoint's DNS target for a family, as written into the socket address. */
static __always_inline int dns_target_of(__u32 endpoint_id, int v4, struct warden_sockaddr *out)
{
	struct warden_dns_target *t = bpf_map_lookup_elem(&dns_targets, &endpoint_id);

	if (!t)
		return 0;
	__builtin_memset(out, 0, sizeof(*out));
	if (v4) {
		__u32 a;

		if (t->port4 == 0)
			return 0;
		__builtin_memcpy(&a, t->addr4, 4);
		v4_mapped((struct addr16 *)out->addr, a);
		out->port = t->port4;
		out->family = WARDEN_AF_INET;
	} else {
		if (t->port6 == 0)
			return 0;
		__builtin_memcpy(out->addr, t->addr6, 16);
		out->port = t->port6;
		out->family = WARDEN_AF_INET6;
	}
	return 1;
}

static __always_inline int is_dns_target(__u32 endpoint_id, const struct addr16 *dst, __u16 port)
{
	struct warden_sockaddr t;

	if (dns_target_of(endpoint_id, is_v4_mapped(dst), &t))
		return t.port == port && addr_eq(t.addr, dst->b);
	return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                     */

static __always_inline void emit_drop(__u64 cgroup_id, __u32 endpoint_id, __u8 family, __u8 proto,
				      __u8 reason, const struct addr16 *src, __u16 src_port,
				      const struct addr16 *dst, __u16 dst_port)
{
	struct warden_drop_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

	/* A full ring buffer loses the event, never the verdict. */
	if (!ev)
		return;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->time_ns = bpf_ktime_get_boot_ns();
	ev->cgroup_id = cgroup_id;
	ev->endpoint_id = endpoint_id;
	ev->family = family;
	ev->proto = proto;
	ev->reason = reason;
	if (src)
		__builtin_memcpy(ev->src, src->b, 16);
	__builtin_memcpy(ev->dst, dst->b, 16);
	ev->src_port = src_port;
	ev->dst_port = dst_port;
	bpf_ringbuf_submit(ev, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Socket hooks                                                                               */

static __always_inline void read_user_ip6(struct bpf_sock_addr *ctx, struct addr16 *a)
{
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2],
	      w3 = ctx->user_ip6[3];

	__builtin_memcpy(&a->b[0], &w0, 4);
	__builtin_memcpy(&a->b[4], &w1, 4);
	__builtin_memcpy(&a->b[8], &w2, 4);
	__builtin_memcpy(&a->b[12], &w3, 4);
}

static __always_inline void write_user_ip6(struct bpf_sock_addr *ctx, const __u8 *a)
{
	__u32 w0, w1, w2, w3;

	__builtin_memcpy(&w0, a, 4);
	__builtin_memcpy(&w1, a + 4, 4);
	__builtin_memcpy(&w2, a + 8, 4);
	__builtin_memcpy(&w3, a + 12, 4);
	ctx->user_ip6[0] = w0;
	ctx->user_ip6[1] = w1;
	ctx->user_ip6[2] = w2;
	ctx->user_ip6[3] = w3;
}

static __always_inline void write_user_ip4(struct bpf_sock_addr *ctx, const __u8 *mapped)
{
	__u32 a;

	__builtin_memcpy(&a, mapped + 12, 4);
	ctx->user_ip4 = a;
}

/*
 * A loopback or unspecified destination of a socket in another network namespace than the
 * proxies' (a pod's own): a resolver there (a sidecar, a local cache) is the workload's own and
 * answers it directly; redirected, the query would reach the proxy, which would ask its own
 * namespace's loopback instead. A resolver the sidecar asks in turn is redirected as usual.
 */
static __always_inline int local_elsewhere(struct bpf_sock_addr *ctx, const struct addr16 *dst)
{
	__u32 zero = 0;
	struct warden_node_config *node;

	if (!is_loopback(dst) && !is_unspecified(dst))
		return 0;
	node = bpf_map_lookup_elem(&node_config, &zero);
	if (!node || node->proxy_netns_cookie == 0)
		return 0;
	return bpf_get_netns_cookie(ctx) != node->proxy_netns_cookie;
}

/*
 * Whether this is a dual-stack socket's send to the v4-mapped peer it is connected to. The
 * kernel sends such a socket's datagrams through its IPv4 path, which runs sendmsg4 with the
 * connected address on every send, no address given: for a socket redirected at its connect,
 * the DNS target, and the original saved then is still the one this query is for. (A send
 * naming the connected peer explicitly looks the same to the hook, and is taken the same way.
 * An IPv4 socket's sends to its peer run no hook; one naming the target itself is a query to
 * it. A dual-stack socket that once sends to another server by name, between sends to its
 * peer, has that server's original kept for the sends after: rare, and not told apart.)
 */
static __always_inline int sends_to_own_peer(struct bpf_sock_addr *ctx, int v6, __u8 reason,
					     const struct addr16 *dst, __u16 port)
{
	struct bpf_sock *sk;
	__u32 a;

	if (v6 || reason != WARDEN_DROP_SENDMSG || ctx->family != WARDEN_AF_INET6)
		return 0;
	sk = ctx->sk;
	if (!sk || sk->state != BPF_TCP_ESTABLISHED)
		return 0;
	__builtin_memcpy(&a, &dst->b[12], 4);
	return sk->dst_ip4 == a && bpf_ntohs(sk->dst_port) == port;
}

/*
 * connect and sendmsg, both families. v6 tells which ctx fields hold the address; a v4-mapped
 * destination of a dual-stack socket is redirected to the IPv4 target in v4-mapped form, which
 * is what such a socket can reach. Returns the verdict (1 allow, 0 EPERM).
 */
static __always_inline int sock_egress(struct bpf_sock_addr *ctx, int v6, __u8 reason)
{
	struct warden_endpoint *ep;
	__u64 cgroup_id = 0;
	struct addr16 dst;
	__u16 port;
	__u8 proto;
	__u32 flags, endpoint_id;
	int to_target;

	ep = endpoint_of_current(&cgroup_id);
	if (!ep)
		return 1;
	flags = ep->flags;
	endpoint_id = ep->endpoint_id;

	port = bpf_ntohs((__u16)ctx->user_port);
	proto = (__u8)ctx->protocol;
	if (v6)
		read_user_ip6(ctx, &dst);
	else
		v4_mapped(&dst, ctx->user_ip4);

	if (port == DNS_PORT && (flags & WARDEN_EP_REDIRECT_DNS) &&
	    (proto == IPPROTO_UDP || proto == IPPROTO_TCP) && !local_elsewhere(ctx, &dst)) {
		struct warden_sock_orig so = {};
		int mapped = is_v4_mapped(&dst);

		/* A workload addressing its DNS target itself (a target on port 53) is not
		 * redirected, and no original is remembered, or the proxy would forward the query
		 * to itself: it is a send to the target, as on any port, below. */
		if (dns_target_of(endpoint_id, !v6 || mapped, &so.target) &&
		    !(addr_eq(so.target.addr, dst.b) && so.target.port == port)) {
			struct warden_sock_orig *kept = NULL;

			__builtin_memcpy(so.orig.addr, dst.b, 16);
			so.orig.port = port;
			so.orig.family = v6 ? WARDEN_AF_INET6 : WARDEN_AF_INET;
			so.target.family = so.orig.family;
			__u64 cookie = bpf_get_socket_cookie(ctx);
			struct warden_sock_orig *by_cookie;

			if (ctx->sk)
				kept = bpf_sk_storage_get(&sock_origins, ctx->sk, 0,
							  BPF_SK_STORAGE_GET_F_CREATE);
			/* A resolver's socket asks the same server query after query: written only
			 * when it changes. (A thread reading it meanwhile, in egress, can see half of
			 * a change; only a socket switching servers mid-query could.) */
			if (kept && !sock_orig_eq(kept, &so))
				*kept = so;
			/* And by cookie, for a release before the storage (see sock_orig). An LRU
			 * update allocates and takes locks; a lookup, which also keeps the entry
			 * young, does not. */
			by_cookie = bpf_map_lookup_elem(&sock_orig, &cookie);
			/* An update the LRU refuses (its free lists starved) must not leave an older
			 * entry to outvote the storage: a removal allocates nothing. */
			if ((!by_cookie || !sock_orig_eq(by_cookie, &so)) &&
			    bpf_map_update_elem(&sock_orig, &cookie, &so, BPF_ANY))
				bpf_map_delete_elem(&sock_orig, &cookie);
			if (v6)
				write_user_ip6(ctx, so.target.addr);
			else
				write_user_ip4(ctx, so.target.addr);
			ctx->user_port = bpf_htons(so.target.port);
			return 1;
		}
	}

	to_target = (flags & WARDEN_EP_REDIRECT_DNS) && is_dns_target(endpoint_id, &dst, port);
	if (to_target) {
		/* Sent to the DNS target itself: an original saved by an earlier, redirected send
		 * of this socket is not this query's (see record_redirect), unless the socket is
		 * sending to the peer it was connected to. */
		if (!sends_to_own_peer(ctx, v6, reason, &dst, port)) {
			__u64 cookie = bpf_get_socket_cookie(ctx);

			if (ctx->sk)
				bpf_sk_storage_delete(&sock_origins, ctx->sk);
			if (bpf_map_lookup_elem(&sock_orig, &cookie))
				bpf_map_delete_elem(&sock_orig, &cookie);
		}
	}
	if (!(flags & WARDEN_EP_ENFORCED))
		return 1;
	if (to_target || is_loopback(&dst) || is_unspecified(&dst) ||
	    (!(flags & WARDEN_EP_REDIRECT_DNS) && is_dns_target(endpoint_id, &dst, port)))
		return 1;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		if (fqdn_allowed(endpoint_id, &dst, proto, port) ||
		    cidr_allowed(endpoint_id, &dst, proto, port, 1))
			return 1;
		if (proto == IPPROTO_UDP && is_udp_reply(bpf_get_socket_cookie(ctx), &dst, port))
			return 1;
	} else if (fqdn_allowed(endpoint_id, &dst, proto, 0) ||
		   cidr_allowed(endpoint_id, &dst, proto, 0, 0)) {
		return 1;
	}
	emit_drop(cgroup_id, endpoint_id, v6 ? WARDEN_AF_INET6 : WARDEN_AF_INET, proto, reason, NULL,
		  0, &dst, port);
	return 0;
}

/* recvmsg and getpeername: where the application would see its DNS target, show it the server
 * it addressed. Only sockets redirected by us (known cookie) and only the target's address are
 * touched. These hooks cannot refuse: they always return 1. */
static __always_inline int sock_restore(struct bpf_sock_addr *ctx, int v6)
{
	struct warden_sock_orig *so = sock_orig_of(ctx->sk, bpf_get_socket_cookie(ctx));
	struct addr16 peer;
	__u16 port;

	if (!so)
		return 1;
	port = bpf_ntohs((__u16)ctx->user_port);
	if (v6)
		read_user_ip6(ctx, &peer);
	else
		v4_mapped(&peer, ctx->user_ip4);
	if (port != so->target.port || !addr_eq(peer.b, so->target.addr))
		return 1;
	if (v6)
		write_user_ip6(ctx, so->orig.addr);
	else
		write_user_ip4(ctx, so->orig.addr);
	ctx->user_port = bpf_htons(so->orig.port);
	return 1;
}

SEC("cgroup/connect4")
int warden_conn4(struct bpf_sock_addr *ctx)
{
	return sock_egress(ctx, 0, WARDEN_DROP_CONNECT);
}

SEC("cgroup/connect6")
int warden_conn6(struct bpf_sock_addr *ctx)
{
	return sock_egress(ctx, 1, WARDEN_DROP_CONNECT);
}

SEC("cgroup/sendmsg4")
int warden_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_egress(ctx, 0, WARDEN_DROP_SENDMSG);
}

SEC("cgroup/sendmsg6")
int warden_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_egress(ctx, 1, WARDEN_DROP_SENDMSG);
}

SEC("cgroup/recvmsg4")
int warden_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_restore(ctx, 0);
}

SEC("cgroup/recvmsg6")
int warden_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock_restore(ctx, 1);
}

SEC("cgroup/getpeername4")
int warden_peer4(struct bpf_sock_addr *ctx)
{
	return sock_restore(ctx, 0);
}

SEC("cgroup/getpeername6")
int warden_peer6(struct bpf_sock_addr *ctx)
{
	return sock_restore(ctx, 1);
}

/* A UDP socket bound to a port of the workload's choosing is a service (see udp_services).
 * Never refuses. */
static __always_inline int sock_bind(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 *mark;

	if (ctx->protocol != IPPROTO_UDP || ctx->user_port == 0 || !sk)
		return 1;
	mark = bpf_sk_storage_get(&udp_services, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (mark)
		*mark = 1;
	return 1;
}

SEC("cgroup/bind4")
int warden_bind4(struct bpf_sock_addr *ctx)
{
	return sock_bind(ctx);
}

SEC("cgroup/bind6")
int warden_bind6(struct bpf_sock_addr *ctx)
{
	return sock_bind(ctx);
}

/* ------------------------------------------------------------------------------------------ */
/* Inbound connections                                                                        */

SEC("sockops")
int warden_sockops(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;
	struct warden_inbound *mark;

	if (!sk)
		return 1;
	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* An active open (a socket reconnecting after a disconnect, say): no longer a reply
		 * channel. Nothing to free for a socket never marked. */
		bpf_sk_storage_delete(&inbound_conns, sk);
		return 1;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		break;
	default:
		return 1;
	}
	mark = bpf_sk_storage_get(&inbound_conns, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!mark)
		return 1;
	if (ops->family == 2 /* AF_INET */) {
		struct addr16 peer;

		v4_mapped(&peer, ops->remote_ip4);
		__builtin_memcpy(mark->peer, peer.b, 16);
	} else {
		__u32 words[4] = { ops->remote_ip6[0], ops->remote_ip6[1], ops->remote_ip6[2],
				   ops->remote_ip6[3] };

		__builtin_memcpy(mark->peer, words, 16);
	}
	/* Network order in the upper half of the field. */
	mark->port = (__u16)bpf_ntohl(ops->remote_port);
	return 1;
}

static __always_inline int is_raw_socket(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	return sk && sk->type == 3 /* SOCK_RAW */;
}

/* A packet of a TCP connection a peer opened: the SYN-ACK, which the hook sees as the
 * listener's (the kernel runs it with the full socket, and a listener sends nothing else;
 * under SYN cookies the SYN-ACK has no socket and the hook does not run), or a later packet of
 * the accepted socket, to the peer it was accepted from. Only the kernel's TCP stack sends
 * from either; a raw socket crafting TCP is neither. */
static __always_inline int is_inbound_reply(struct __sk_buff *skb, const struct addr16 *dst,
					    __u16 dport, __u8 proto)
{
	struct bpf_sock *sk = skb->sk;
	struct warden_inbound *mark;

	if (!sk || proto != IPPROTO_TCP)
		return 0;
	if (sk->state == BPF_TCP_LISTEN)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 0;
	mark = bpf_sk_storage_get(&inbound_conns, sk, 0, 0);
	return mark && mark->port == dport && addr_eq(mark->peer, dst->b);
}

/* ------------------------------------------------------------------------------------------ */
/* Packet egress                                                                              */

struct pkt {
	struct addr16 src;
	struct addr16 dst;
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 proto;
	__u8 l4;     /* ports were parsed */
	__u8 reason; /* drop reason if the policy does not allow the packet */
};

#define IPV4_MF_OFFSET 0x3fff /* more-fragments flag and fragment offset */
#define IPV4_OFFSET 0x1fff

#ifndef IPV6_TLV_JUMBO
#define IPV6_TLV_JUMBO 0xC2
#endif

static __always_inline int is_ipv6_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case 0:   /* hop-by-hop */
	case 43:  /* routing */
	case 44:  /* fragment */
	case 50:  /* ESP */
	case 51:  /* AH */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
		return 1;
	}
	return 0;
}

/* Returns 0 when the headers could not be read. In cgroup_skb the packet starts at the IP
 * header. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	__u8 first;
	__u16 ports[2];

	if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)
		return 0;
	if ((first >> 4) == 4) {
		struct iphdr ip;
		__u32 ihl;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return 0;
		ihl = ip.ihl * 4;
		if (ihl < sizeof(ip))
			return 0;
		p->family = WARDEN_AF_INET;
		p->proto = ip.protocol;
		v4_mapped(&p->src, ip.saddr);
		v4_mapped(&p->dst, ip.daddr);
		if (ip.frag_off & bpf_htons(IPV4_OFFSET)) {
			/* Not the first fragment: no L4 header to read. The egress hook runs before
			 * IP fragmentation (ip_finish_output), so ordinary sockets never show us
			 * fragments; only raw sockets building their own do. */
			p->reason = WARDEN_DROP_FRAGMENT;
			return 1;
		}
		if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP) {
			p->reason = WARDEN_DROP_NO_PORTS;
			return 1;
		}
		if (bpf_skb_load_bytes(skb, ihl, ports, sizeof(ports)) < 0)
			return 0;
	} else if ((first >> 4) == 6) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
			return 0;
		p->family = WARDEN_AF_INET6;
		p->proto = ip6.nexthdr;
		__builtin_memcpy(p->src.b, &ip6.saddr, 16);
		__builtin_memcpy(p->dst.b, &ip6.daddr, 16);
		if (ip6.nexthdr == 0) {
			/* A hop-by-hop header holding a jumbo payload option alone, as IPv6 BIG TCP
			 * puts before TCP in GSO packets past 64 KiB (kernels from 6.3, when
			 * gso_ipv6_max_size is raised): skipped, the protocol and ports after it
			 * read. Any other hop-by-hop header is an extension header as below. */
			__u8 hbh[8];

			if (bpf_skb_load_bytes(skb, sizeof(ip6), hbh, sizeof(hbh)) == 0 &&
			    hbh[1] == 0 && hbh[2] == IPV6_TLV_JUMBO && hbh[3] == 4 &&
			    (hbh[0] == IPPROTO_TCP || hbh[0] == IPPROTO_UDP)) {
				p->proto = hbh[0];
				if (bpf_skb_load_bytes(skb, sizeof(ip6) + sizeof(hbh), ports,
						       sizeof(ports)) < 0)
					return 0;
				goto ports_read;
			}
		}
		if (is_ipv6_ext(ip6.nexthdr)) {
			/* Extension headers are not walked: the real protocol and ports are unknown,
			 * so the packet counts as port-less with an unknown protocol (proto 0). Only
			 * a rule allowing everything to the destination lets it through. TCP and UDP
			 * sockets add none unless asked to (IPV6_HOPOPTS and the like), and the hook
			 * runs before fragmentation (ip6_finish_output), so large UDP datagrams are
			 * seen whole, with their ports. */
			p->proto = 0;
			p->reason = WARDEN_DROP_IPV6_EXT;
			return 1;
		}
		if (ip6.nexthdr != IPPROTO_TCP && ip6.nexthdr != IPPROTO_UDP) {
			p->reason = WARDEN_DROP_NO_PORTS;
			return 1;
		}
		if (bpf_skb_load_bytes(skb, sizeof(ip6), ports, sizeof(ports)) < 0)
			return 0;
	} else {
		return 0;
	}
ports_read:
	p->sport = bpf_ntohs(ports[0]);
	p->dport = bpf_ntohs(ports[1]);
	p->l4 = 1;
	p->reason = WARDEN_DROP_EGRESS;
	return 1;
}

static __always_inline __u32 redirect_slot_of(const struct warden_client_key *key)
{
	__u32 words[4];
	__u32 h = 0;

	__builtin_memcpy(words, key->addr, 16);
	h = (h ^ words[0]) * WARDEN_REDIRECT_GOLDEN;
	h = (h ^ words[1]) * WARDEN_REDIRECT_GOLDEN;
	h = (h ^ words[2]) * WARDEN_REDIRECT_GOLDEN;
	h = (h ^ words[3]) * WARDEN_REDIRECT_GOLDEN;
	h = (h ^ ((__u32)key->port | ((__u32)key->proto << 16))) * WARDEN_REDIRECT_GOLDEN;
	return h >> (32 - WARDEN_REDIRECT_SLOT_BITS);
}

/* The record again in its slot of redirect_slots, where the proxy reads it without a system
 * call (warden.h has the protocol). Written after the LRU entry and before the packet leaves,
 * so a proxy that has received the packet finds the slot written. */
static __always_inline void publish_redirect(const struct warden_client_key *key,
					     const struct warden_redirect_record *rec)
{
	__u32 index = redirect_slot_of(key);
	struct warden_redirect_slot *slot = bpf_map_lookup_elem(&redirect_slots, &index);
	__u64 seq;

	if (!slot)
		return;
	seq = *(volatile __u64 *)&slot->seq;
	/* Another writer is inside: leave the slot to it. A reader then finds its key there and
	 * asks the LRU map for ours. Were its key ours (one socket sending from two CPUs at once,
	 * to two servers, or two sockets sharing the port), the slot keeps one of the two records
	 * and the LRU map possibly the other: the same ambiguity the LRU map alone has, one record
	 * per client key, with the two packets in flight together. */
	if (seq & 1)
		return;
	/* The slot already vouches for this very record, stamped a moment ago (or later, by
	 * another CPU): leave it, so that its cache line stays shared with the proxy reading it
	 * instead of moving to this CPU for a write per packet. The fields are read outside the
	 * lock and BPF has no read barrier, so the second read of the sequence number only
	 * narrows the window: a writer of another key racing in can still be missed, which
	 * leaves that writer's record in the slot and ours in the LRU map, where a reader
	 * finding another key looks. */
	if (seq != 0 &&
	    (__s64)(rec->time_ns - slot->time_ns) < (__s64)WARDEN_REDIRECT_REFRESH_NS &&
	    slot->cgroup_id == rec->cgroup_id && addr_eq(slot->addr, key->addr) &&
	    slot->port == key->port && slot->proto == key->proto &&
	    slot->orig_port == rec->orig.port && slot->orig_family == rec->orig.family &&
	    addr_eq(slot->orig_addr, rec->orig.addr) && *(volatile __u64 *)&slot->seq == seq)
		return;
	if (__sync_val_compare_and_swap(&slot->seq, seq, seq + 1) != seq)
		return;
	__builtin_memcpy(slot->addr, key->addr, 16);
	slot->port = key->port;
	slot->proto = key->proto;
	slot->pad0 = 0;
	slot->orig_port = rec->orig.port;
	slot->orig_family = rec->orig.family;
	slot->pad1 = 0;
	slot->cgroup_id = rec->cgroup_id;
	slot->time_ns = rec->time_ns;
	__builtin_memcpy(slot->orig_addr, rec->orig.addr, 16);
	/* A compare-and-swap, not an add: it is a full barrier on every architecture (an add whose
	 * result is unused compiles to a relaxed one), so the fields are visible before the even
	 * sequence number that vouches for them. Ours while odd, so it cannot fail. */
	__sync_val_compare_and_swap(&slot->seq, seq + 1, seq + 2);
}

/* How often an unchanged redirect record's stamp is renewed (see record_redirect). */
#define RECORD_REFRESH_NS 1000000000ULL

/* Remember who asked and which server was meant, keyed the way the proxy sees the client. A
 * socket that addressed the target itself (the proxy's address, or a port-53 target) meant no
 * other server: its record has no original (family 0), and the proxy asks its upstream. It
 * still names the cgroup: without a record the proxy would know the sender by address only,
 * which a host-network workload does not have, and take it for an unenforced one; and it
 * replaces what an earlier, redirected socket on the same port left. */
static __always_inline void record_redirect(struct __sk_buff *skb, const struct pkt *p,
					    __u64 cgroup_id)
{
	struct bpf_sock *sk = skb->sk;
	struct warden_sock_orig *so;
	struct warden_client_key key = {};
	struct warden_redirect_record rec = {};
	struct warden_redirect_record *known;

	if (sk)
		sk = bpf_sk_fullsock(sk);
	so = sock_orig_of(sk, bpf_get_socket_cookie(skb));
	__builtin_memcpy(key.addr, p->src.b, 16);
	key.port = p->sport;
	key.proto = p->proto;
	rec.cgroup_id = cgroup_id;
	rec.time_ns = bpf_ktime_get_boot_ns();
	if (so)
		rec.orig = so->orig;
	known = bpf_map_lookup_elem(&redirect_records, &key);
	/* The same client asking the same server again (the common case): the lookup keeps the
	 * entry young, and an LRU update, which allocates and takes locks, is paid only when the
	 * record changes, or once a second to keep its stamp recent: the proxy takes no record
	 * older than a few seconds, which another socket on the same port long ago left (one
	 * of a cgroup not enrolled writes none). */
	if (!known || known->cgroup_id != rec.cgroup_id || !sockaddr_eq(&known->orig, &rec.orig) ||
	    rec.time_ns - known->time_ns >= RECORD_REFRESH_NS)
		bpf_map_update_elem(&redirect_records, &key, &rec, BPF_ANY);
	publish_redirect(&key, &rec);
}

static __always_inline void touch_last_seen(__u32 endpoint_id, const struct addr16 *dst)
{
	struct warden_last_seen_key k = {};
	__u64 now = bpf_ktime_get_boot_ns();
	__u64 *seen;

	k.endpoint_id = endpoint_id;
	__builtin_memcpy(k.addr, dst->b, 16);
	seen = bpf_map_lookup_elem(&last_seen, &k);
	/* One write a second per destination is enough for an idle timeout counted in seconds. */
	if (seen && now - *seen < 1000000000ULL)
		return;
	bpf_map_update_elem(&last_seen, &k, &now, BPF_ANY);
}

SEC("cgroup_skb/egress")
int warden_egress(struct __sk_buff *skb)
{
	struct warden_endpoint *ep;
	__u64 cgroup_id = 0;
	struct pkt p = {};
	__u32 flags, endpoint_id;
	int to_target;

	ep = endpoint_of_skb(skb, &cgroup_id);
	if (!ep)
		return 1;
	flags = ep->flags;
	endpoint_id = ep->endpoint_id;

	if (!parse(skb, &p)) {
		if (!(flags & WARDEN_EP_ENFORCED))
			return 1;
		emit_drop(cgroup_id, endpoint_id, p.family, p.proto, WARDEN_DROP_MALFORMED, &p.src,
			  0, &p.dst, 0);
		return 0;
	}

	/* A raw socket writes its own headers, sources included: what it sends writes no redirect
	 * record, whose client key the proxy takes on trust. (Its packets are judged by policy like
	 * any other; a workload with CAP_NET_RAW can also use packet sockets, which no cgroup hook
	 * sees: see docs/operations.md.) */
	to_target = p.l4 && is_dns_target(endpoint_id, &p.dst, p.dport);
	if (to_target && (flags & WARDEN_EP_REDIRECT_DNS) && !is_raw_socket(skb))
		record_redirect(skb, &p, cgroup_id);

	if (!(flags & WARDEN_EP_ENFORCED) || to_target || is_loopback(&p.dst))
		return 1;
	if (p.l4 && is_inbound_reply(skb, &p.dst, p.dport, p.proto))
		return 1;
	if (fqdn_allowed(endpoint_id, &p.dst, p.proto, p.l4 ? p.dport : 0)) {
		touch_last_seen(endpoint_id, &p.dst);
		return 1;
	}
	if (cidr_allowed(endpoint_id, &p.dst, p.proto, p.dport, p.l4))
		return 1;
	if (p.l4 && p.proto == IPPROTO_UDP &&
	    is_udp_reply(bpf_get_socket_cookie(skb), &p.dst, p.dport))
		return 1;
	emit_drop(cgroup_id, endpoint_id, p.family, p.proto, p.reason, &p.src, p.sport, &p.dst,
		  p.dport);
	return 0;
}

/* What an enforced endpoint's UDP service hears opens its reply window to the sender (only
 * services: a socket with a port the kernel chose sends what it sends by policy alone). A
 * datagram that came over loopback from another address opens none: the workload itself can
 * write one with any source (a raw socket to its own service), and would open a window to
 * wherever it likes. At most one map write a second per peer. Never drops. */
SEC("cgroup_skb/ingress")
int warden_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct warden_udp_peer key = {};
	struct warden_endpoint *ep;
	__u64 cgroup_id = 0;
	struct pkt p = {};
	__u64 now, *seen;

	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_UDP)
		return 1;
	if (!bpf_sk_storage_get(&udp_services, sk, 0, 0))
		return 1;
	if (!parse(skb, &p) || !p.l4 || p.proto != IPPROTO_UDP)
		return 1;
	if (skb->ingress_ifindex == WARDEN_LOOPBACK_IFINDEX && !addr_eq(p.src.b, p.dst.b))
		return 1;
	ep = endpoint_of_skb(skb, &cgroup_id);
	if (!ep || !(ep->flags & WARDEN_EP_ENFORCED))
		return 1;
	key.cookie = bpf_get_socket_cookie(skb);
	key.peer_port = p.sport;
	__builtin_memcpy(key.peer, p.src.b, 16);
	now = bpf_ktime_get_boot_ns();
	seen = bpf_map_lookup_elem(&udp_peers, &key);
	if (seen && now - *seen < 1000000000ULL)
		return 1;
	bpf_map_update_elem(&udp_peers, &key, &now, BPF_ANY);
	return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* SO_REUSEPORT selection                                                                     */

/* Picks one of the instance's sockets of `slot`, the one the kernel's hash of the client's
 * addresses names among the slot's own and its spread, so that each of its listener loops gets
 * a share; the slot's own when the spread is empty (a process registering one socket) or the
 * socket named closed. */
static __always_inline int select_slot(struct sk_reuseport_md *md, __u32 hash, __u32 slot)
{
	__u32 *count = bpf_map_lookup_elem(&reuseport_spread_count, &slot);

	if (count && *count > 0) {
		__u32 extra = *count;

		if (extra > WARDEN_REUSEPORT_SPREAD)
			extra = WARDEN_REUSEPORT_SPREAD;
		__u32 pick = hash % (extra + 1);
		if (pick > 0) {
			__u32 index = slot * WARDEN_REUSEPORT_SPREAD + pick - 1;
			if (bpf_sk_select_reuseport(md, &reuseport_spread, &index, 0) == 0)
				return 1;
		}
	}
	return bpf_sk_select_reuseport(md, &reuseport_sockets, &slot, 0) == 0;
}

/* The preferred instance's socket of this protocol, else any other instance's, else the
 * kernel's hash (SK_PASS without a selection). A closed socket leaves the array by itself, so
 * a dead instance is skipped without userspace help. Selecting a socket of another group
 * (other protocol or port) fails cleanly and is skipped. */
SEC("sk_reuseport")
int warden_reuse(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	struct warden_reuseport_config *cfg = bpf_map_lookup_elem(&reuseport_config, &zero);
	/* The same program serves the IPv4 and IPv6 groups; each instance has a slot per group. */
	__u32 base = (md->eth_protocol == bpf_htons(0x86DD) ? 2 : 0) +
		     (md->ip_protocol == IPPROTO_TCP ? 1 : 0);
	/* Read here, once: the verifier refuses a context field read through a pointer the
	 * compiler would otherwise keep to it across the loop. */
	__u32 hash = md->hash;
	__u32 preferred, slot;

	if (!cfg || !cfg->enabled)
		return SK_PASS;
	preferred = cfg->preferred;
	if (preferred < WARDEN_REUSEPORT_INSTANCES) {
		slot = preferred * 4 + base;
		if (select_slot(md, hash, slot))
			return SK_PASS;
	}
	for (__u32 i = 0; i < WARDEN_REUSEPORT_INSTANCES; i++) {
		if (i == preferred)
			continue;
		slot = i * 4 + base;
		if (select_slot(md, hash, slot))
			return SK_PASS;
	}
	return SK_PASS;
}
