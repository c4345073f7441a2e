// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

// btmm-relay's kernel forwarder: a TC ingress program on the relay's
// interface that forwards ESP-in-UDP (RFC 3948) between two bound hosts
// without the packet reaching userspace. A datagram for one of the relay's
// allocation ports from a bound source (flows map, written by Go) gets its
// outer addresses and ports rewritten (source: the relay's address and the
// sender's own allocation port; destination: the owner's bound source),
// its UDP checksum zeroed (RFC 3948 §2.1 allows it) and is redirected out.
// Datagrams starting with the non-ESP marker (control, keying, probes) and
// NAT keepalives pass to the relay's sockets, as does ESP for an owner
// attached by a TLS stream (rewrite with port 0: Go frames it onto the
// stream); anything else for the allocation ports from an unbound source
// is dropped here.

#include "../../bpf/btmm.h"

char __license[] SEC("license") = "Dual BSD/GPL";

struct relay_config {
	__u8 addr[4];    // the relay's IPv4 address (allocations live there)
	__u16 port_min;  // allocation ports, host byte order
	__u16 port_max;
};

struct flow_key {
	__u8 from_addr[4]; // the sender's source address
	__u16 from_port;   // its source port, host order
	__u16 in_port;     // the allocation port it sent to
};

struct rewrite {
	__u8 to_addr[4];
	__u16 to_port;
	__u16 out_port;
	__u64 limit; // bytes; 0 = unlimited
};

struct flow_stats {
	__u64 packets;
	__u64 bytes;
	__u64 dropped;
};

enum verdict_reason {
	R_FORWARDED = 0,
	R_UNBOUND = 1,  // ESP for an allocation port from an unbound source
	R_QUOTA = 2,    // the flow's byte limit is reached
	R_NO_ROUTE = 3, // no route to the owner
	R_TO_STACK = 4, // passed to the relay's sockets (control, keying, fragments, TTL)
	R_MAX = 5,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct relay_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct rewrite);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_stats);
} flow_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, R_MAX);
	__type(key, __u32);
	__type(value, __u64);
} verdicts SEC(".maps");

static __always_inline void count(enum verdict_reason r)
{
	__u32 k = r;
	__u64 *n = bpf_map_lookup_elem(&verdicts, &k);
	if (n)
		*n += 1;
}

static __always_inline __u16 csum_ip(const struct iphdr *ip)
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

#define HDRS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))

SEC("tc")
int relay_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct relay_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	if (bpf_skb_pull_data(skb, HDRS + 4) < 0)
		return TC_ACT_OK; // shorter than any ESP packet: not ours to judge
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct udphdr *udp = (void *)ip + sizeof(*ip);
	__u8 *payload = (void *)udp + sizeof(*udp);
	if ((void *)(payload + 4) > end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl_version != 0x45 || ip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	if (*(__u32 *)cfg->addr != ip->daddr)
		return TC_ACT_OK;
	__u16 dport = bpf_ntohs(udp->dest);
	if (dport < cfg->port_min || dport > cfg->port_max)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) {
		count(R_TO_STACK); // reassembled by the stack, forwarded by Go
		return TC_ACT_OK;
	}
	if (*(__u32 *)payload == 0 || bpf_ntohs(udp->len) <= sizeof(*udp) + 1) {
		count(R_TO_STACK); // non-ESP marker (control, keying, probes) or keepalive
		return TC_ACT_OK;
	}
	struct flow_key k = {};
	__builtin_memcpy(k.from_addr, &ip->saddr, 4);
	k.from_port = bpf_ntohs(udp->source);
	k.in_port = dport;
	struct rewrite *rw = bpf_map_lookup_elem(&flows, &k);
	if (!rw) {
		count(R_UNBOUND);
		return TC_ACT_SHOT;
	}
	if (rw->to_port == 0) {
		count(R_TO_STACK); // the owner is attached by a stream (relay-tcp): Go writes to it
		return TC_ACT_OK;
	}
	if (ip->ttl <= 1) {
		count(R_TO_STACK); // let the stack send the ICMP time exceeded
		return TC_ACT_OK;
	}
	struct flow_stats *st = bpf_map_lookup_elem(&flow_counters, &k);
	if (st) {
		__u64 before = __sync_fetch_and_add(&st->bytes, skb->len);
		if (rw->limit && before + skb->len > rw->limit) {
			__sync_fetch_and_add(&st->dropped, 1);
			count(R_QUOTA);
			return TC_ACT_SHOT;
		}
		__sync_fetch_and_add(&st->packets, 1);
	}
	ip->saddr = ip->daddr;
	__builtin_memcpy(&ip->daddr, rw->to_addr, 4);
	ip->ttl -= 1;
	ip->check = 0;
	ip->check = csum_ip(ip);
	udp->source = bpf_htons(rw->out_port);
	udp->dest = bpf_htons(rw->to_port);
	udp->check = 0;

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.ifindex = skb->ifindex;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		eth = data;
		if ((void *)(eth + 1) > end)
			return TC_ACT_SHOT;
		__builtin_memcpy(eth->h_dest, fib.dmac, 6);
		__builtin_memcpy(eth->h_source, fib.smac, 6);
		count(R_FORWARDED);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_BLACKHOLE || rc == BPF_FIB_LKUP_RET_UNREACHABLE || rc == BPF_FIB_LKUP_RET_PROHIBIT ||
	    fib.ifindex == 0) {
		count(R_NO_ROUTE);
		return TC_ACT_SHOT;
	}
	// Route found, neighbour not resolved yet: let the kernel resolve it.
	count(R_FORWARDED);
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}
