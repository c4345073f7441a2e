// Package ebpf is btmm's eBPF encapsulation dataplane (RFC 6281 §7.3.2 with
// RFC 3948 UDP encapsulation of ESP), built on Linux TC BPF programs (TCX on
// kernels >= 6.6, clsact + a direct-action cls_bpf filter before that) and
// XFRM.
//
// Security associations are bound to the hosts' ULAs: XFRM does ESP in
// tunnel mode with an outer IPv6 header ULA -> ULA, and the TC egress program
// swaps that header for IPv4 | UDP addressed to the peer's current outer
// address, read from a BPF map. On the wire the packets are the same bytes an
// XFRM state with espinudp encapsulation sends, so a host on this dataplane
// talks to a host on package xfrm's. When a peer moves, Go rewrites one map
// entry (plus the reverse lookup entry) and touches no SA: sequence numbers
// and keys stay, and during a transfer Go does nothing at all.
//
// A cleartext mode (IPv6 in UDP, no ESP) exists only behind Config.Cleartext,
// for kernels without ESP or for traffic that is already encrypted; Status
// says so in capitals.
//
// Kernel objects: programs and maps pinned under Config.PinRoot
// (/sys/fs/bpf/btmm by default; `bpftool map dump pinned
// /sys/fs/bpf/btmm/peer_by_ula` shows the peers), TCX links pinned beside
// them, /128 routes to the peers' ULAs tagged with routing protocol 98,
// permanent neighbour entries for those ULAs, and XFRM states and policies
// tagged with reqid 0xb7e0f. Close removes exactly those.
//
// The C source is bpf/btmm.c; `go generate` rebuilds btmm_bpfel.{go,o}.
package ebpf
