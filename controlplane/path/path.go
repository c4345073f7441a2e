package path

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/dns/register"
)

// Kind is how traffic reaches a peer.
type Kind uint8

// Path kinds, most preferred first in DefaultPreference.
const (
	KindNone     Kind = iota
	KindLAN           // the peer's own address on a network we share (two hosts behind one NAT)
	KindDirect        // the peer's public address or its PCP/NAT-PMP mapping
	KindPunched       // a reflexive endpoint opened by simultaneous probes (hole punching)
	KindRelayUDP      // the peer's allocation on a btmm-relay, over UDP
	KindRelayTCP      // the same allocation reached over one TLS stream (UDP blocked)
	// Tunnel-device kinds (issue 15, docs/tunnels.md): the dataplane
	// carries the traffic in a device, ESP in transport mode between the
	// ULAs inside, and the checks run through that device (Candidate.Probe).
	KindIPv6 // ip6tnl between the hosts' global IPv6 addresses
	KindSit  // sit (IP protocol 41) between public IPv4 addresses
	KindFOU  // sit over GUE (Linux fou) to the peer's FOU port, through NATs
	numKinds
)

var kindNames = [...]string{"none", "lan", "direct", "punched", "relay-udp", "relay-tcp", "ipv6", "sit", "fou"}

// Tunnel reports whether k is carried by a tunnel device.
func (k Kind) Tunnel() bool { return k == KindIPv6 || k == KindSit || k == KindFOU }

// PathKind is the dataplane's path kind for k: a tunnel kind, or
// ESP-in-UDP for every other kind (LAN, direct, punched and relayed
// paths differ only in the outer endpoint).
func (k Kind) PathKind() controlplane.PathKind {
	switch k {
	case KindIPv6:
		return controlplane.PathIPv6
	case KindSit:
		return controlplane.PathSit
	case KindFOU:
		return controlplane.PathFOU
	}
	return controlplane.PathESPInUDP
}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// ParseKind is the inverse of String.
func ParseKind(s string) (Kind, error) {
	if i := slices.Index(kindNames[:], strings.ToLower(s)); i > 0 {
		return Kind(i), nil
	}
	return KindNone, fmt.Errorf("path: unknown kind %q (want one of %s)", s, strings.Join(kindNames[1:], ", "))
}

// MarshalText implements encoding.TextMarshaler (JSON status).
func (k Kind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *Kind) UnmarshalText(b []byte) error {
	v, err := ParseKind(string(b))
	if err != nil && string(b) != "none" {
		return err
	}
	*k = v
	return nil
}

// DefaultPreference ranks path kinds, best first: plain IPv6 (no UDP, no
// NAT keepalives), then sit (protocol 41, both hosts public), then FOU
// (GUE through NATs), then ESP-in-UDP over IPv4 — a LAN path beats a
// direct one, which beats a hole-punched one; relays come last. A kind
// only wins while its checks answer: a failing preferred path gives way.
var DefaultPreference = []Kind{KindIPv6, KindSit, KindFOU, KindLAN, KindDirect, KindPunched, KindRelayUDP, KindRelayTCP}

// Path is one way to reach a peer: its kind and outer endpoints.
type Path struct {
	Kind Kind `json:"kind"`
	// Local is our end: the tunnel socket's address, or for KindRelayTCP
	// the local bridge socket the dataplane sends to. Zero: the kernel's
	// choice of source on the route to Remote.
	Local netip.AddrPort `json:"local"`
	// Remote is where ESP and keying messages for the peer go: the peer's
	// tunnel port (LAN, direct, punched) or its relay allocation.
	Remote netip.AddrPort `json:"remote"`
}

// IsValid reports whether p names a path.
func (p Path) IsValid() bool { return p.Kind != KindNone && p.Remote.IsValid() }

func (p Path) String() string {
	if !p.IsValid() {
		return "none"
	}
	return p.Kind.String() + " " + p.Remote.String()
}

// Candidate is a remote endpoint worth probing.
type Candidate struct {
	Kind Kind           `json:"kind"`
	Addr netip.AddrPort `json:"addr"`
	// Source says where it came from: "srv" (the SRV/A records), "txt"
	// (a c-<kind> key), "prflx" (a probe arrived from it).
	Source string `json:"source"`
	// Probe, when valid, is where checks of this candidate go instead of
	// Addr: for tunnel kinds the peer's link-local address through the
	// tunnel device (WithTunnelProbes), so a check travels exactly as the
	// traffic will.
	Probe netip.AddrPort `json:"probe,omitzero"`
}

// TXT candidate kinds (register.Candidate.Kind) and the path kind each gives.
var txtKinds = map[string]Kind{
	"lan":   KindLAN,
	"map":   KindDirect,
	"pub":   KindDirect,
	"rfx":   KindPunched,
	"relay": KindRelayUDP,
	// Tunnel endpoints (issue 15): c-v6=[global IPv6]:<keying port>
	// (ip6tnl there, keying over IPv6 to it), c-sit=<public IPv4>:<keying
	// port> (protocol 41 accepted there, no NAT; the candidate's port is 0),
	// c-fou=<IPv4>:<port> (the host's GUE port as its NAT maps it).
	"v6":  KindIPv6,
	"sit": KindSit,
	"fou": KindFOU,
}

// TXTKind is the register.Candidate kind under which a host publishes its
// own candidates of kind k ("" for kinds that are not published).
func TXTKind(k Kind) string {
	for s, v := range txtKinds {
		if v == k && s != "pub" {
			return s
		}
	}
	return ""
}

// CandidatesFrom turns a peer's published records into candidates: the
// SRV/A endpoint (published, possibly invalid) and the c-<kind> TXT keys.
// The SRV/A endpoint is "direct" unless the TXT says it is a reflexive or
// relay endpoint. Kinds this version does not know, and non-IPv4
// endpoints (issue 15 brings those), are skipped. A peer that publishes
// only today's records has one candidate.
func CandidatesFrom(published netip.AddrPort, caps register.Capabilities) []Candidate {
	var out []Candidate
	seen := map[netip.AddrPort]bool{}
	for _, c := range caps.Candidates {
		k, ok := txtKinds[c.Kind]
		if !ok || seen[c.Addr] || c.Addr.Addr().Is4() == (k == KindIPv6) || k == KindIPv6 && !globalIPv6(c.Addr.Addr()) {
			continue
		}
		if k == KindLAN && c.Addr == published && !private(c.Addr.Addr()) {
			k = KindDirect // its own address is public: reachable by anyone
		}
		addr := c.Addr
		if k == KindSit {
			// sit has no port: port 0 keeps it apart from the ESP-in-UDP
			// candidate at the same address (c-sit's port is the keying port).
			addr = netip.AddrPortFrom(addr.Addr(), 0)
			if seen[addr] {
				continue
			}
		}
		seen[addr] = true
		out = append(out, Candidate{Kind: k, Addr: addr, Source: "txt"})
	}
	if published.IsValid() && published.Addr().Is4() && !seen[published] {
		out = append(out, Candidate{Kind: KindDirect, Addr: published, Source: "srv"})
	}
	return out
}

// cgnatPrefix is RFC 6598's shared address space.
var cgnatPrefix = netip.MustParsePrefix("100.64.0.0/10")

// private reports an address only its own network reaches (RFC 1918,
// RFC 6598): published as the SRV/A endpoint (a gateway that answered
// nothing, "treated as public") it is still a LAN candidate.
func private(a netip.Addr) bool { return a.IsPrivate() || cgnatPrefix.Contains(a) }

func globalIPv6(a netip.Addr) bool {
	return a.Is6() && !a.Is4In6() && a.IsGlobalUnicast() && !identity.IsULA(a) && a.Zone() == ""
}

// WithTunnelProbes prepares a peer's tunnel candidates for checks: those of
// a kind this host cannot use (usable false: no global IPv6 of ours, we
// are behind a NAT for sit, no FOU port) are dropped, and each other one
// is probed at the peer's link-local address through its tunnel device
// (controlplane.TunnelLinkLocal, TunnelDevice) on the peer's keying port.
// A peer's sit and fou candidates share one device: only the better ranked
// of them (by rank, lower first) stays. Other candidates pass unchanged.
func WithTunnelProbes(peer netip.Addr, keyingPort uint16, cands []Candidate, usable func(Kind) bool, rank func(Kind) int) []Candidate {
	var out []Candidate
	v4 := -1 // index in out of the sit or fou candidate kept
	for _, c := range cands {
		if !c.Kind.Tunnel() {
			out = append(out, c)
			continue
		}
		if !usable(c.Kind) {
			continue
		}
		if c.Kind != KindIPv6 {
			if v4 >= 0 {
				if rank(c.Kind) >= rank(out[v4].Kind) {
					continue
				}
				out = slices.Delete(out, v4, v4+1)
			}
			v4 = len(out)
		}
		ll := controlplane.TunnelLinkLocal(peer).WithZone(controlplane.TunnelDevice(c.Kind.PathKind(), peer))
		c.Probe = netip.AddrPortFrom(ll, keyingPort)
		out = append(out, c)
	}
	return out
}

// Tunnels are the dataplane's tunnel endpoints for a peer's tunnel
// candidates (those WithTunnelProbes kept): the device of each exists
// whatever path is chosen, so both the checks and the peer's traffic on
// any of them get through.
func Tunnels(cands []Candidate) []controlplane.Tunnel {
	var out []controlplane.Tunnel
	for _, c := range cands {
		switch c.Kind {
		case KindIPv6, KindSit:
			out = append(out, controlplane.Tunnel{Kind: c.Kind.PathKind(), Remote: netip.AddrPortFrom(c.Addr.Addr(), 0)})
		case KindFOU:
			out = append(out, controlplane.Tunnel{Kind: controlplane.PathFOU, Remote: c.Addr})
		}
	}
	return out
}
