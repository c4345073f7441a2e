package path

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

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
	numKinds
)

var kindNames = [...]string{"none", "lan", "direct", "punched", "relay-udp", "relay-tcp"}

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

// DefaultPreference ranks path kinds, best first: a LAN path beats a
// direct one, which beats a hole-punched one; relays come last.
var DefaultPreference = []Kind{KindLAN, KindDirect, KindPunched, KindRelayUDP, KindRelayTCP}

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
}

// TXT candidate kinds (register.Candidate.Kind) and the path kind each gives.
var txtKinds = map[string]Kind{
	"lan":   KindLAN,
	"map":   KindDirect,
	"pub":   KindDirect,
	"rfx":   KindPunched,
	"relay": KindRelayUDP,
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
		if !ok || !c.Addr.Addr().Is4() || seen[c.Addr] {
			continue
		}
		if k == KindLAN && c.Addr == published {
			k = KindDirect // its own address is public: reachable by anyone
		}
		seen[c.Addr] = true
		out = append(out, Candidate{Kind: k, Addr: c.Addr, Source: "txt"})
	}
	if published.IsValid() && published.Addr().Is4() && !seen[published] {
		out = append(out, Candidate{Kind: KindDirect, Addr: published, Source: "srv"})
	}
	return out
}
