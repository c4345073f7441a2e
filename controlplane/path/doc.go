// Package path chooses how this host reaches each of its peers: the
// connectivity checks of ICE (RFC 8445 §6.1.4, §7.2: every candidate pair
// probed at once, peer-reflexive candidates learnt from the checks
// themselves, triggered checks) and Tailscale's disco ping/pong, run on the
// keying channel (the tunnel port's UDP socket, behind the RFC 3948 non-ESP
// marker), so that a probe opens exactly the NAT mapping ESP will use.
//
// A Path has a Kind (LAN, direct, hole-punched, relayed over UDP or TCP;
// issue 15 adds IPv6, sit and FOU kinds) and outer endpoints. Each peer
// publishes Candidates (its SRV/A endpoint and the c-<kind> TXT keys of
// package dns/register); a Selector probes every candidate when the peer
// appears or changes, or when our own network changed (Kick), picks the best
// path that answers (by a configurable Preference, then round-trip time),
// falls back when the chosen path stops answering, and keeps probing better
// candidates at a low rate to upgrade, e.g. from a relay to a direct path.
//
// Probes are authenticated: each host has a per-boot X25519 key (Key) whose
// public half it publishes (TXT pk=); a probe carries the sender's public key
// and an HMAC-SHA-256 tag keyed from the X25519 shared secret of the pair, so
// only the peer named in the DNS can make us choose a path, and a probe from
// an unknown key costs a map lookup and nothing else.
//
// Datagrams on the keying channel are told apart by Classify: keying
// messages (package keying), probes (first byte 0xB7) and STUN (RFC 8489,
// magic cookie). Mux splits one keying.Transport into the three.
package path
