// Package relay is btmm's last-resort path (docs/paths.md): a relay that
// forwards ESP-in-UDP (RFC 3948) between two hosts of one user that cannot
// reach each other directly (both behind symmetric NATs, CGNAT without PCP),
// in the manner of a TURN server (RFC 8656) without TURN's framing, so that
// the hosts' kernels send and receive plain ESP-in-UDP and the relay's
// kernel forwards it (package ebpf/relay) without holding any key.
//
// The control protocol is STUN (RFC 8489, encoded with pion/stun), sent
// from a host's tunnel socket behind the RFC 3948 non-ESP marker (answers
// carry the marker too, so the host's ESP-in-UDP socket hands them to
// userspace and the NAT mapping used is the tunnel's own):
//
//   - Binding (0x001): the reflexive address (XOR-MAPPED-ADDRESS) of the
//     sender; unauthenticated, also answered without the marker for plain
//     STUN clients. Two listen addresses let a host tell an
//     endpoint-independent NAT from a symmetric one (DetectNAT).
//   - Allocate (0x003) / Refresh (0x004): a relay port for one host, for a
//     LIFETIME; Refresh with LIFETIME 0 deletes it.
//   - Bind (0xB07, btmm): sent by host B to host A's relay port, naming B's
//     own allocation (XOR-RELAYED-ADDRESS): "datagrams from this source at
//     this port are B's". Once A has bound at B's port too, ESP from B
//     arriving at A's port leaves from B's port to A's bound source, and the
//     other way round: each host sees its peer at the peer's relay port.
//
// Allocate, Refresh and Bind carry USERNAME (a TSIG key name of btmm-dnsd:
// the user's key, or a host's), BTMM-HOST (the host's name), BTMM-TIME
// (Unix seconds; ±2 min, each transaction once) and MESSAGE-INTEGRITY-SHA256
// keyed with HKDF(TSIG secret); the relay answers signed with the same key.
// A key may act only for host names at or below its own name, and a Bind
// joins only two allocations of one user. Allocations per user, bytes per
// allocation and lifetimes are bounded (Config).
package relay
