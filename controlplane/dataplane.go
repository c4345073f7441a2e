package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

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
	if !s.Local.ULA.Is6() || !netip.MustParsePrefix("fc00::/7").Contains(s.Local.ULA) {
		errs = append(errs, fmt.Errorf("local ULA %v is not an IPv6 ULA (fc00::/7)", s.Local.ULA))
	}
	if s.Local.Port == 0 {
		errs = append(errs, errors.New("local tunnel port is 0"))
	}
	seen := map[netip.Addr]bool{}
	spis := map[uint32]bool{}
	for _, p := range s.Peers {
		if !p.ULA.Is6() || !netip.MustParsePrefix("fc00::/7").Contains(p.ULA) {
			errs = append(errs, fmt.Errorf("peer %q: ULA %v is not an IPv6 ULA", p.Name, p.ULA))
		}
		if p.ULA == s.Local.ULA {
			errs = append(errs, fmt.Errorf("peer %q: ULA %v is our own", p.Name, p.ULA))
		}
		if seen[p.ULA] {
			errs = append(errs, fmt.Errorf("peer %q: ULA %v listed twice", p.Name, p.ULA))
		}
		seen[p.ULA] = true
		if !p.Outer.Addr().Is4() || p.Outer.Port() == 0 {
			errs = append(errs, fmt.Errorf("peer %q: outer address %v is not IPv4:port", p.Name, p.Outer))
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
