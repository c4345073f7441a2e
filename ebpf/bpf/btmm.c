// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

// btmm's TC programs (RFC 6281 §7.3.2 with RFC 3948 framing).
//
// Secure mode: XFRM does ESP in tunnel mode between the hosts' ULAs, so what
// reaches egress is IPv6(our ULA -> peer ULA, next header ESP) | ESP. The
// egress program swaps that 40-byte IPv6 header for IPv4 | UDP addressed to
// the peer's current outer address (RFC 3948 ESP-in-UDP: the same bytes as an
// XFRM state with espinudp encapsulation). Ingress does the reverse for ESP
// arriving on our tunnel port from a known peer, and XFRM decrypts.
//
// Cleartext mode (explicit opt-in): the whole IPv6 packet rides in UDP, no ESP.
//
// Keying messages (RFC 3948 non-ESP marker: four zero bytes) and NAT
// keepalives (one 0xff byte) pass to the socket untouched.

#include "btmm.h"

char __license[] SEC("license") = "Dual BSD/GPL";

// Secure mode: the mark bit ingress sets on ESP it decapsulated from UDP.
// XFRM tells the two inbound SAs of one SPI apart by it for a peer that
// also has tunnel devices: ESP-in-UDP arrives here (tunnel mode, the SA and
// policy with this mark), ESP through a sit/ip6tnl device without it
// (transport mode). Go: ebpf.ESPInUDPMark.
#define ESP_IN_UDP_MARK 0x04000000

enum mode {
	MODE_OFF = 0,
	MODE_SECURE = 1,
	MODE_CLEARTEXT = 2,
};

// Why a packet was dropped; the index into the drops map.
enum drop_reason {
	DROP_UNKNOWN_PEER = 0,  // ingress: tunnel port, not keying, sender unknown
	DROP_MALFORMED = 1,     // truncated or inconsistent headers on our port
	DROP_FRAGMENT = 2,      // fragmented ESP / tunnel packet on our port
	DROP_OVERSIZE = 3,      // encapsulated packet exceeds the device MTU
	DROP_NOT_ESP = 4,       // secure mode: a packet to a peer ULA that XFRM did not encrypt
	DROP_SPOOFED = 5,       // cleartext: inner addresses are not the peer's and ours
	DROP_NO_ROUTE = 6,      // no IPv4 route to the peer's outer address
	DROP_ADJUST_FAILED = 7, // the kernel refused to resize the packet
	DROP_MAX = 8,
};

struct btmm_config {
	__u8 local_ula[16];
	__u16 port; // our tunnel port, host byte order
	__u8 mode;  // enum mode
	__u8 pad;
};

struct ula {
	__u8 addr[16];
};

// Addresses are byte arrays and ports host-order numbers so that
// `bpftool map dump` shows them as a person reads them.
struct peer {
	__u8 outer_addr[4]; // the peer's current outer IPv4 address
	__u8 local_addr[4]; // our IPv4 source towards it
	__u16 outer_port;   // the peer's tunnel port
	__u16 pad;
};

struct outer {
	__u8 addr[4];
	__u16 port;
	__u16 pad;
};

// Per-peer counters. Packets are skbs as the programs see them: a GSO
// super-packet counts once, its bytes all.
struct counters {
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 drops;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct btmm_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ula);
	__type(value, struct peer);
} peer_by_ula SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct outer);
	__type(value, struct ula);
} peer_by_outer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ula);
	__type(value, struct counters);
} peer_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

static __always_inline int drop(enum drop_reason why, struct counters *st)
{
	__u32 k = why;
	__u64 *n = bpf_map_lookup_elem(&drops, &k);
	if (n)
		*n += 1;
	if (st)
		st->drops += 1;
	return TC_ACT_SHOT;
}

static __always_inline __u16 ip_checksum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline int same_addr(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

// Fill in the Ethernet addresses for the IPv4 packet now in skb and send it.
// Fast path: a FIB lookup with a resolved neighbour (needs forwarding enabled
// on the device). Otherwise the neighbour subsystem resolves the next hop
// (ARP) through bpf_redirect_neigh.
static __always_inline int send_ipv4(struct __sk_buff *skb, struct ethhdr *eth, __be32 src, __be32 dst,
				     struct counters *st)
{
	__u32 mtu = 0;
	if (bpf_check_mtu(skb, 0, &mtu, 0, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return drop(DROP_OVERSIZE, st);

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.ifindex = skb->ifindex;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		__builtin_memcpy(eth->h_dest, fib.dmac, 6);
		__builtin_memcpy(eth->h_source, fib.smac, 6);
		if (st) {
			st->tx_packets += 1;
			st->tx_bytes += skb->len;
		}
		if (fib.ifindex == skb->ifindex)
			return TC_ACT_OK;
		return bpf_redirect(fib.ifindex, 0);
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		return drop(DROP_NO_ROUTE, st);
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		return drop(DROP_OVERSIZE, st);
	}
	if (st) {
		st->tx_packets += 1;
		st->tx_bytes += skb->len;
	}
	return bpf_redirect_neigh(skb->ifindex, 0, 0, 0);
}

SEC("tc")
int btmm_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct btmm_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || cfg->mode == MODE_OFF)
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_OK;

	const __u32 hlen = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	if (skb->len < hlen)
		return TC_ACT_OK; // not a whole IPv6 header: not tunnel traffic
	if (bpf_skb_pull_data(skb, hlen) < 0)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + hlen > end)
		return TC_ACT_OK;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	if ((((__u8 *)ip6)[0] >> 4) != 6)
		return TC_ACT_OK;

	struct ula key;
	__builtin_memcpy(key.addr, ip6->daddr, 16);
	struct peer *p = bpf_map_lookup_elem(&peer_by_ula, &key);
	if (!p)
		return TC_ACT_OK; // not to one of our peers
	struct counters *st = bpf_map_lookup_elem(&peer_stats, &key);
	struct peer pc = *p;

	__u8 tclass = (bpf_ntohs(*(__u16 *)ip6) >> 4) & 0xff;
	__u32 l3len = skb->len - sizeof(struct ethhdr); // IPv6 header + payload
	if (sizeof(struct ipv6hdr) + bpf_ntohs(ip6->payload_len) > l3len)
		return drop(DROP_MALFORMED, st);

	__u32 outer_len;
	if (cfg->mode == MODE_SECURE) {
		// Fail closed: only ESP from our own ULA leaves towards a peer.
		if (ip6->nexthdr != IPPROTO_ESP || !same_addr(ip6->saddr, cfg->local_ula))
			return drop(DROP_NOT_ESP, st);
		if (skb->gso_segs > 1 || skb->gso_size)
			return drop(DROP_OVERSIZE, st);
		outer_len = l3len - sizeof(struct ipv6hdr) + sizeof(struct iphdr) + sizeof(struct udphdr);
		// 40-byte IPv6 header -> 20 bytes (and skb->protocol = IPv4),
		// then 8 more bytes for UDP right after the Ethernet header.
		if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IP), 0) < 0)
			return drop(DROP_ADJUST_FAILED, st);
		if (bpf_skb_adjust_room(skb, sizeof(struct udphdr), BPF_ADJ_ROOM_MAC, 0) < 0)
			return drop(DROP_ADJUST_FAILED, st);
	} else {
		// The peer accepts only our ULA as the inner source; do not send
		// what it would drop as spoofed.
		if (!same_addr(ip6->saddr, cfg->local_ula))
			return drop(DROP_SPOOFED, st);
		outer_len = l3len + sizeof(struct iphdr) + sizeof(struct udphdr);
		if (bpf_skb_adjust_room(skb, sizeof(struct iphdr) + sizeof(struct udphdr), BPF_ADJ_ROOM_MAC,
					BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
						BPF_F_ADJ_ROOM_ENCAP_L4_UDP) < 0)
			return drop(DROP_ADJUST_FAILED, st);
		if (skb->protocol != bpf_htons(ETH_P_IP))
			return drop(DROP_ADJUST_FAILED, st); // kernel without 6-in-4 protocol switch
	}
	if (outer_len > 0xffff)
		return drop(DROP_OVERSIZE, st);

	const __u32 olen = sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr);
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (data + olen > end)
		return drop(DROP_ADJUST_FAILED, st);
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *udp = (void *)ip + sizeof(struct iphdr);

	eth->h_proto = bpf_htons(ETH_P_IP);
	ip->ihl_version = 0x45;
	ip->tos = tclass;
	ip->tot_len = bpf_htons(outer_len);
	ip->id = 0;
	ip->frag_off = bpf_htons(IP_DF);
	ip->ttl = 64;
	ip->protocol = IPPROTO_UDP;
	ip->check = 0;
	__builtin_memcpy(&ip->saddr, pc.local_addr, 4);
	__builtin_memcpy(&ip->daddr, pc.outer_addr, 4);
	ip->check = ip_checksum(ip);
	udp->source = bpf_htons(cfg->port);
	udp->dest = bpf_htons(pc.outer_port);
	udp->len = bpf_htons(outer_len - sizeof(struct iphdr));
	udp->check = 0; // RFC 3948 §2.1: IPv4 UDP checksum zero
	if (pc.outer_addr[0] == 127) {
		// A loopback outer address is btmmd's relay-tcp bridge socket
		// (docs/paths.md): the peer is reached over a TLS stream to the
		// relay, which Go carries. Hand the datagram to this host's
		// stack as if it arrived on lo (Ethernet addresses zero: lo's
		// own, so the stack takes it as for this host).
		__builtin_memset(eth->h_dest, 0, 6);
		__builtin_memset(eth->h_source, 0, 6);
		if (st) {
			st->tx_packets += 1;
			st->tx_bytes += skb->len;
		}
		return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
	}
	return send_ipv4(skb, eth, ip->saddr, ip->daddr, st);
}

SEC("tc")
int btmm_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct btmm_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || cfg->mode == MODE_OFF)
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;

	const __u32 eth_ip = sizeof(struct ethhdr) + sizeof(struct iphdr);
	if (bpf_skb_pull_data(skb, skb->len < 64 ? skb->len : 64) < 0)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + eth_ip > end)
		return TC_ACT_OK; // shorter than an IPv4 header: not ours to judge
	struct iphdr *ip = data + sizeof(struct ethhdr);
	if (ip->protocol != IPPROTO_UDP || (ip->ihl_version >> 4) != 4)
		return TC_ACT_OK;
	__u16 frag = bpf_ntohs(ip->frag_off);
	if (frag & IP_OFFSET)
		return TC_ACT_OK; // later fragment: no ports to look at; the stack reassembles
	__u32 ihl = (ip->ihl_version & 0x0f) * 4;
	if (ihl < sizeof(struct iphdr))
		return TC_ACT_OK;
	if (ihl != sizeof(struct iphdr)) {
		// Options: find the port first, then refuse if it is ours.
		struct udphdr u;
		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + ihl, &u, sizeof(u)) < 0)
			return TC_ACT_OK;
		if (u.dest != bpf_htons(cfg->port))
			return TC_ACT_OK;
		return drop(DROP_MALFORMED, 0);
	}
	const __u32 hlen = eth_ip + sizeof(struct udphdr);
	if (data + hlen > end) {
		// Too short for UDP: ours only if the port bytes that are there say so.
		return TC_ACT_OK;
	}
	struct udphdr *udp = (void *)ip + sizeof(struct iphdr);
	if (udp->dest != bpf_htons(cfg->port))
		return TC_ACT_OK;

	// Our tunnel port from here on.
	__u32 l3len = skb->len - sizeof(struct ethhdr);
	__u16 tot = bpf_ntohs(ip->tot_len);
	__u16 ulen = bpf_ntohs(udp->len);
	if (tot > l3len || tot < sizeof(struct iphdr) + sizeof(struct udphdr) || ip_checksum(ip) != 0)
		return drop(DROP_MALFORMED, 0);
	if (!(frag & IP_MF) && ulen != tot - sizeof(struct iphdr))
		return drop(DROP_MALFORMED, 0);
	if ((frag & IP_MF) && ulen < sizeof(struct udphdr))
		return drop(DROP_MALFORMED, 0);
	__u32 plen = ulen - sizeof(struct udphdr); // UDP payload length

	// Keying (non-ESP marker) and NAT keepalives go to the socket as they are.
	__u8 first[8] = {};
	__u32 have = tot - sizeof(struct iphdr) - sizeof(struct udphdr);
	if (have >= 8) {
		if (bpf_skb_load_bytes(skb, hlen, first, 8) < 0)
			return drop(DROP_MALFORMED, 0);
	} else if (have >= 4) {
		if (bpf_skb_load_bytes(skb, hlen, first, 4) < 0)
			return drop(DROP_MALFORMED, 0);
	} else if (have >= 1) {
		if (bpf_skb_load_bytes(skb, hlen, first, 1) < 0)
			return drop(DROP_MALFORMED, 0);
	}
	if (have >= 4 && *(__u32 *)first == 0)
		return TC_ACT_OK;
	if (have == 1 && first[0] == 0xff)
		return TC_ACT_OK;

	struct outer ok = {.port = bpf_ntohs(udp->source)};
	__builtin_memcpy(ok.addr, &ip->saddr, 4);
	struct ula *pu = bpf_map_lookup_elem(&peer_by_outer, &ok);
	if (!pu)
		return drop(DROP_UNKNOWN_PEER, 0);
	struct ula peer = *pu;
	struct counters *st = bpf_map_lookup_elem(&peer_stats, &peer);
	if (frag & IP_MF)
		return drop(DROP_FRAGMENT, st); // we and XFRM send with DF: never ours
	__u8 tos = ip->tos;
	__u32 rx_len = skb->len;

	if (cfg->mode == MODE_SECURE) {
		if (plen < 8 || skb->gso_segs > 1 || skb->gso_size)
			return drop(DROP_MALFORMED, st);
		// IPv4(20)+UDP(8) -> IPv6(40): +20 and skb->protocol = IPv6, then -8.
		if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0) < 0)
			return drop(DROP_ADJUST_FAILED, st);
		if (bpf_skb_adjust_room(skb, -(__s32)sizeof(struct udphdr), BPF_ADJ_ROOM_MAC, 0) < 0)
			return drop(DROP_ADJUST_FAILED, st);
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr) > end)
			return drop(DROP_ADJUST_FAILED, st);
		struct ethhdr *eth = data;
		struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		ip6->vtc_flow = bpf_htonl(0x60000000 | ((__u32)tos << 20));
		ip6->payload_len = bpf_htons(plen);
		ip6->nexthdr = IPPROTO_ESP;
		ip6->hop_limit = 64;
		__builtin_memcpy(ip6->saddr, peer.addr, 16);
		__builtin_memcpy(ip6->daddr, cfg->local_ula, 16);
		skb->mark |= ESP_IN_UDP_MARK;
	} else {
		struct ipv6hdr in;
		if (plen < sizeof(in) || bpf_skb_load_bytes(skb, hlen, &in, sizeof(in)) < 0)
			return drop(DROP_MALFORMED, st);
		if ((((__u8 *)&in)[0] >> 4) != 6 || sizeof(in) + bpf_ntohs(in.payload_len) > plen)
			return drop(DROP_MALFORMED, st);
		if (!same_addr(in.saddr, peer.addr) || !same_addr(in.daddr, cfg->local_ula))
			return drop(DROP_SPOOFED, st);
		// IPv4(20)+UDP(8) before an IPv6 packet: +20 (protocol IPv6), then -48.
		if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0) < 0)
			return drop(DROP_ADJUST_FAILED, st);
		if (bpf_skb_adjust_room(skb, -(__s32)(sizeof(struct ipv6hdr) + sizeof(struct udphdr)),
					BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO) < 0)
			return drop(DROP_ADJUST_FAILED, st);
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + sizeof(struct ethhdr) > end)
			return drop(DROP_ADJUST_FAILED, st);
		((struct ethhdr *)data)->h_proto = bpf_htons(ETH_P_IPV6);
	}
	if (st) {
		st->rx_packets += 1;
		st->rx_bytes += rx_len;
	}
	return TC_ACT_OK;
}
