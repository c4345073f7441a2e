package controlplane

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"time"

	"github.com/btmm/btmm/controlplane/identity"
)

// NonESPMarker is RFC 3948 §2.2's four zero bytes in front of a datagram on
// the ESP-in-UDP port that is not ESP (an ESP SPI is never 0): keying
// messages and the relay's control messages. The one definition; do not
// modify.
var NonESPMarker = [4]byte{}

// DefaultTunnelPort is the UDP port for ESP-in-UDP and keying (RFC 3948's 4500).
const DefaultTunnelPort = 4500

// Cipher names the ESP transform of an SA pair.
type Cipher string

// The ESP transforms btmm uses: AES-GCM by default, AES-CBC with
// HMAC-SHA-256 as the fallback for kernels without GCM.
const (
	CipherAESGCM     Cipher = "rfc4106(gcm(aes))"     // key: 16/24/32-byte AES key + 4-byte salt
	CipherAESCBCHMAC Cipher = "cbc(aes)+hmac(sha256)" // key: 16/32-byte AES key, then 32-byte HMAC key
)

// SA is one direction of ESP keying material between two ULAs. Key holds the
// raw key bytes the kernel wants for Cipher (for AES-GCM the salt is the last
// four bytes). Key is secret: String never prints it.
type SA struct {
	SPI    uint32
	Cipher Cipher
	Key    []byte
}

// String describes the SA without its key.
func (s SA) String() string {
	return fmt.Sprintf("spi=0x%08x %s key=[%d bytes redacted]", s.SPI, s.Cipher, len(s.Key))
}

// Local is this host's side of every tunnel.
type Local struct {
	ULA  netip.Addr // this host's IPv6 ULA (RFC 6281 §6.3)
	Port uint16     // local UDP tunnel port (default 4500)
	// Outer is the local IPv4 address packets leave from. Zero means the
	// kernel's choice: for each peer, the source address of the kernel's
	// route to the peer's outer address (`ip route get <peer outer>`),
	// looked up again at every Set.
	Outer netip.Addr
	// Device is the interface that carries the tunnel traffic, for
	// dataplanes that attach to one (eBPF). Empty means the IPv4 default
	// route's device, looked up again at every Set.
	Device string
	// Outer6 is our global IPv6 address for PathIPv6 tunnels. Zero means
	// the kernel's choice: the source of its route to each peer's IPv6
	// address, looked up again at every Set.
	Outer6 netip.Addr
	// FOUPort is the local UDP port that receives GUE (PathFOU tunnels,
	// `ip fou add port FOUPort gue`); 0: no FOU, and FOU tunnels are refused.
	FOUPort uint16
}

// A local move (new outer address, new default route or device, a NAT
// gateway swapped for another) needs no new keys: a Set after the move,
// with the new Local or with the same zero Outer/Device (whose lookups then
// give the new answers), moves every SA pair, policy template, route, BPF
// attachment and map entry to the new source. The agent says "we moved" by
// calling Reconciler.SetLocal, which always applies.

// Peer is one of the user's other hosts as the dataplane must see it.
type Peer struct {
	Name  string         // host name, for status and logs only
	ULA   netip.Addr     // the peer's IPv6 ULA
	Outer netip.AddrPort // where the peer's tunnel port is reachable now (NAT's public address:port)
	Out   SA             // traffic from us to the peer
	In    SA             // traffic from the peer to us
	// PrevIn are inbound SAs of an earlier keying kept for packets in
	// flight during a rekey (make-before-break). They are removed when
	// they disappear from the desired state.
	PrevIn []SA
	// Via is the path traffic to the peer is sent on: ESP-in-UDP to Outer
	// (the zero value) or the kind of one of Tunnels. Changing it moves
	// the traffic (a route) and touches no key: no rekey, no SA re-added.
	Via PathKind
	// Tunnels are the peer's endpoints for tunnel devices (at most one
	// IPv6 tunnel and one IPv4 one, sit or FOU). A dataplane keeps a device
	// for each whatever Via says, so that traffic the peer sends on any of
	// them is received: the two sides choose their paths independently.
	// Outer may be invalid when Via is a tunnel (an IPv6-only peer).
	Tunnels []Tunnel
}

// PathKind is how traffic to a peer is carried. docs/tunnels.md shows each
// kind's packet layout. ESP protects the ULA-to-ULA traffic on every kind:
// tunnel mode inside UDP for ESP-in-UDP, transport mode between the ULAs
// inside the tunnel devices.
type PathKind uint8

// Path kinds.
const (
	// PathESPInUDP is RFC 6281's format: IPv4 | UDP | ESP (tunnel mode) | IPv6, to Peer.Outer.
	PathESPInUDP PathKind = iota
	// PathIPv6 is IPv6 | IPv6 (ULA -> ULA) | ESP (transport mode): an
	// ip6tnl (ip6ip6) device between the hosts' global IPv6 addresses.
	PathIPv6
	// PathSit is IPv4 | IPv6 (IP protocol 41) | ESP (transport mode): a sit
	// device between public IPv4 addresses (no NAT on either side).
	PathSit
	// PathFOU is IPv4 | UDP | GUE | IPv6 | ESP (transport mode): the sit
	// device with GUE encapsulation (Linux fou), which passes NATs.
	PathFOU
	numPathKinds
)

var pathKindNames = [...]string{"esp-udp4", "ipv6", "sit", "fou"}

func (k PathKind) String() string {
	if k < numPathKinds {
		return pathKindNames[k]
	}
	return fmt.Sprintf("path(%d)", uint8(k))
}

// MarshalText implements encoding.TextMarshaler (status JSON).
func (k PathKind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *PathKind) UnmarshalText(b []byte) error {
	for i, n := range pathKindNames {
		if n == string(b) {
			*k = PathKind(i)
			return nil
		}
	}
	return fmt.Errorf("unknown path kind %q", b)
}

// Tunnel is a peer's endpoint for one tunnel device.
type Tunnel struct {
	Kind PathKind `json:"kind"` // PathIPv6, PathSit or PathFOU
	// Remote is the peer's outer endpoint: its global IPv6 address
	// (PathIPv6, port 0), its public IPv4 address (PathSit, port 0), or
	// its FOU port as its NAT maps it (PathFOU, IPv4:port).
	Remote netip.AddrPort `json:"remote"`
}

func (t Tunnel) String() string {
	if t.Remote.Port() == 0 {
		return t.Kind.String() + " " + t.Remote.Addr().String()
	}
	return t.Kind.String() + " " + t.Remote.String()
}

// Tunnel returns the peer's tunnel of kind k (ok false: none).
func (p *Peer) Tunnel(k PathKind) (Tunnel, bool) {
	for _, t := range p.Tunnels {
		if t.Kind == k {
			return t, true
		}
	}
	return Tunnel{}, false
}

// TunnelDevice is the name of the device a dataplane makes for a peer's
// tunnel of kind k: "bt6-" (ip6tnl) or "bts-" (sit, with or without FOU)
// and eight hex digits of a hash of the peer's ULA (interface names have
// at most 15 bytes). Empty for ESP-in-UDP.
func TunnelDevice(k PathKind, peer netip.Addr) string {
	h := fnv.New32a()
	b := peer.As16()
	h.Write(b[:])
	switch k {
	case PathIPv6:
		return fmt.Sprintf("bt6-%08x", h.Sum32())
	case PathSit, PathFOU:
		return fmt.Sprintf("bts-%08x", h.Sum32())
	}
	return ""
}

// TunnelLinkLocal is the link-local address a host puts on each of its
// tunnel devices: fe80:: with the interface identifier of its ULA (the low
// 64 bits). A peer knows it from the ULA alone, so connectivity checks can be
// sent through a tunnel device to the host at its other end; no policy
// covers it, so those checks carry no ULA traffic.
func TunnelLinkLocal(ula netip.Addr) netip.Addr {
	b := ula.As16()
	copy(b[:8], []byte{0xfe, 0x80, 0, 0, 0, 0, 0, 0})
	return netip.AddrFrom16(b)
}

// checkTunnel validates one tunnel endpoint.
func checkTunnel(t Tunnel, local Local) error {
	a := t.Remote.Addr()
	switch t.Kind {
	case PathIPv6:
		if !a.Is6() || a.Is4In6() || a.Zone() != "" || !a.IsGlobalUnicast() || identity.IsULA(a) || t.Remote.Port() != 0 {
			return fmt.Errorf("ipv6 tunnel: remote %v is not a global IPv6 address (no port)", t.Remote)
		}
	case PathSit:
		if !a.Is4() || !a.IsGlobalUnicast() || t.Remote.Port() != 0 {
			return fmt.Errorf("sit tunnel: remote %v is not a unicast IPv4 address (no port)", t.Remote)
		}
	case PathFOU:
		if !a.Is4() || !a.IsGlobalUnicast() || t.Remote.Port() == 0 {
			return fmt.Errorf("fou tunnel: remote %v is not a unicast IPv4 address:port", t.Remote)
		}
		if local.FOUPort == 0 {
			return errors.New("fou tunnel: no local FOU port (Local.FOUPort)")
		}
	default:
		return fmt.Errorf("%v is not a tunnel kind", t.Kind)
	}
	return nil
}

// State is the whole desired dataplane: level-triggered, complete each time.
type State struct {
	Local Local
	Peers []Peer
}

// Validate checks a desired state before any kernel object is touched, so bad
// input changes nothing.
func (s *State) Validate() error {
	var errs []error
	if !identity.IsULA(s.Local.ULA) {
		errs = append(errs, fmt.Errorf("local ULA %v is not an IPv6 ULA (fc00::/7)", s.Local.ULA))
	}
	if s.Local.Port == 0 {
		errs = append(errs, errors.New("local tunnel port is 0"))
	}
	if s.Local.FOUPort != 0 && s.Local.FOUPort == s.Local.Port {
		errs = append(errs, fmt.Errorf("local FOU port %d is the tunnel port", s.Local.FOUPort))
	}
	if o := s.Local.Outer6; o.IsValid() && (!o.Is6() || o.Is4In6() || !o.IsGlobalUnicast() || identity.IsULA(o)) {
		errs = append(errs, fmt.Errorf("local IPv6 outer address %v is not a global IPv6 address", o))
	}
	seen := map[netip.Addr]bool{}
	spis := map[uint32]bool{}
	// A tunnel device is found by its remote address (sit: IPv4, ip6tnl:
	// IPv6), so two peers cannot share one.
	remotes := map[netip.Addr]string{}
	for _, p := range s.Peers {
		if !identity.IsULA(p.ULA) {
			errs = append(errs, fmt.Errorf("peer %q: ULA %v is not an IPv6 ULA", p.Name, p.ULA))
		}
		if p.ULA == s.Local.ULA {
			errs = append(errs, fmt.Errorf("peer %q: ULA %v is our own", p.Name, p.ULA))
		}
		if seen[p.ULA] {
			errs = append(errs, fmt.Errorf("peer %q: ULA %v listed twice", p.Name, p.ULA))
		}
		seen[p.ULA] = true
		switch {
		case p.Outer.IsValid() && (!p.Outer.Addr().Is4() || p.Outer.Port() == 0):
			errs = append(errs, fmt.Errorf("peer %q: outer address %v is not IPv4:port (ESP-in-UDP is IPv4; IPv6 goes by an ipv6 tunnel)", p.Name, p.Outer))
		case !p.Outer.IsValid() && p.Via == PathESPInUDP:
			errs = append(errs, fmt.Errorf("peer %q: no outer address for ESP-in-UDP", p.Name))
		}
		var v4, v6 int
		for _, t := range p.Tunnels {
			if err := checkTunnel(t, s.Local); err != nil {
				errs = append(errs, fmt.Errorf("peer %q: %w", p.Name, err))
				continue
			}
			if t.Kind == PathIPv6 {
				v6++
			} else {
				v4++
			}
			if other, dup := remotes[t.Remote.Addr()]; dup {
				errs = append(errs, fmt.Errorf("peer %q: tunnel remote %v is also peer %q's", p.Name, t.Remote.Addr(), other))
			}
			remotes[t.Remote.Addr()] = p.Name
		}
		if v6 > 1 || v4 > 1 {
			errs = append(errs, fmt.Errorf("peer %q: at most one ipv6 tunnel and one sit or fou tunnel (they share the sit device)", p.Name))
		}
		if p.Via >= numPathKinds {
			errs = append(errs, fmt.Errorf("peer %q: unknown path kind %v", p.Name, p.Via))
		} else if _, ok := p.Tunnel(p.Via); p.Via != PathESPInUDP && !ok {
			errs = append(errs, fmt.Errorf("peer %q: path %v but no %v tunnel listed", p.Name, p.Via, p.Via))
		}
		for _, sa := range append([]SA{p.Out, p.In}, p.PrevIn...) {
			if sa.SPI < 0x100 {
				errs = append(errs, fmt.Errorf("peer %q: SPI 0x%x is reserved (< 0x100)", p.Name, sa.SPI))
			}
			if spis[sa.SPI] && sa.SPI != 0 {
				errs = append(errs, fmt.Errorf("peer %q: SPI 0x%x used twice", p.Name, sa.SPI))
			}
			spis[sa.SPI] = true
			if err := sa.checkKey(); err != nil {
				errs = append(errs, fmt.Errorf("peer %q: spi 0x%x: %w", p.Name, sa.SPI, err))
			}
		}
	}
	return errors.Join(errs...)
}

func (s SA) checkKey() error {
	switch s.Cipher {
	case CipherAESGCM:
		if n := len(s.Key); n != 20 && n != 28 && n != 36 {
			return fmt.Errorf("%s wants a 20, 28 or 36-byte key (AES key + salt), got %d", s.Cipher, n)
		}
	case CipherAESCBCHMAC:
		if n := len(s.Key); n != 48 && n != 64 {
			return fmt.Errorf("%s wants 48 or 64 bytes (AES-128/256 key + 32-byte HMAC key), got %d", s.Cipher, n)
		}
	default:
		return fmt.Errorf("unknown cipher %q", s.Cipher)
	}
	return nil
}

// Change is one thing a dataplane did to the kernel, in words a person can
// match against `ip xfrm`, `ip -6 route` or `bpftool` output.
type Change struct {
	Op     string // "add", "update", "move", "delete"
	Object string // e.g. "state", "policy", "route", "map"
	What   string // human readable, never contains key material
}

func (c Change) String() string { return c.Op + " " + c.Object + " " + c.What }

// PeerStats are per-peer counters a dataplane reports.
type PeerStats struct {
	ULA                netip.Addr
	TxPackets, TxBytes uint64
	RxPackets, RxBytes uint64
	Drops              uint64
	LastOuterChange    time.Time
}

// Repair is a dataplane's record of putting back kernel state that someone
// else removed or changed (`ip xfrm state flush`, a deleted route, a detached
// BPF program). It holds no key material.
type Repair struct {
	At    time.Time `json:"at"`              // when the last repair was applied
	What  []string  `json:"what"`            // the changes it applied (Change.String)
	Count int       `json:"count"`           // repairs since the dataplane started
	Err   string    `json:"error,omitempty"` // the last repair's error, if it failed
}

// Repairer is implemented by dataplanes that watch their own kernel objects
// and re-apply the last desired State when someone else removes or changes
// them (rate-limited, logged once per burst). Objects without the
// dataplane's tags are never touched. LastRepair's zero value means no
// repair so far.
type Repairer interface {
	LastRepair() Repair
}

// Dataplane is a kernel backend for the tunnels (package xfrm, package ebpf).
type Dataplane interface {
	// Set makes the kernel match desired. It is idempotent and
	// level-triggered: it diffs desired against what the kernel has, adds
	// before it deletes (so traffic keeps flowing through a change), moves
	// SAs in place when only an outer address or port changed (no rekey,
	// sequence numbers kept), and returns the changes it actually applied.
	// Invalid input is refused before anything is touched. Errors for
	// independent objects are joined; what succeeded is still reported.
	Set(ctx context.Context, desired *State) ([]Change, error)
	// Stats returns per-peer counters.
	Stats(ctx context.Context) ([]PeerStats, error)
	// Close removes every kernel object this dataplane made (and only
	// those), then releases its resources.
	Close() error
}
