package path

import (
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// Probe wire format (after the non-ESP marker), all lengths fixed:
//
//	magic(1)=0xB7 version(1)=1 type(1) flags(1)=0 sender-key(32) txid(12)
//	[PONG only: seen-addr(16, IPv4-mapped for IPv4) seen-port(2)]
//	tag(16) = HMAC-SHA-256(pair key, everything before)[:16]
//
// The first byte keeps probes apart from keying messages (version 1, 2, ...)
// and STUN (RFC 8489: first two bits zero).
const (
	ProbeMagic   = 0xB7
	probeVersion = 1
	keyLen       = 32
	txidLen      = 12
	tagLen       = 16
	probeHdrLen  = 4 + keyLen + txidLen
	pingLen      = probeHdrLen + tagLen
	pongLen      = probeHdrLen + 18 + tagLen
)

// ProbeType is PING or PONG.
type ProbeType uint8

// Probe types.
const (
	Ping ProbeType = 1
	Pong ProbeType = 2
)

func (t ProbeType) String() string {
	switch t {
	case Ping:
		return "PING"
	case Pong:
		return "PONG"
	}
	return fmt.Sprintf("probe(%d)", uint8(t))
}

// Errors of probe parsing and verification.
var (
	ErrMalformed  = errors.New("path: malformed probe")
	ErrUnknownKey = errors.New("path: probe from an unknown key")
	ErrBadTag     = errors.New("path: probe tag does not verify")
)

// Probe is a connectivity check (PING) or its answer (PONG).
type Probe struct {
	Type   ProbeType
	Sender [keyLen]byte  // the sender's public probe key
	TxID   [txidLen]byte // random per PING, echoed in its PONG
	// Seen is, in a PONG, the PING's source as the responder saw it (our
	// endpoint as the peer sees it: reflexive through every NAT between).
	Seen netip.AddrPort
}

// appendBody appends everything the tag covers.
func (p *Probe) appendBody(b []byte) []byte {
	b = append(b, ProbeMagic, probeVersion, byte(p.Type), 0)
	b = append(b, p.Sender[:]...)
	b = append(b, p.TxID[:]...)
	if p.Type == Pong {
		a := p.Seen.Addr().As16()
		b = append(b, a[:]...)
		b = binary.BigEndian.AppendUint16(b, p.Seen.Port())
	}
	return b
}

// Seal encodes p and appends its tag under the pair key.
func (p *Probe) Seal(pairKey []byte) []byte {
	b := p.appendBody(make([]byte, 0, pongLen))
	m := hmac.New(sha256.New, pairKey)
	m.Write(b)
	return m.Sum(b)[:len(b)+tagLen]
}

// ParseProbe decodes a probe without checking its tag (Open does both).
func ParseProbe(b []byte) (Probe, error) {
	var p Probe
	if len(b) < pingLen || b[0] != ProbeMagic {
		return p, ErrMalformed
	}
	if b[1] != probeVersion || b[3] != 0 {
		return p, fmt.Errorf("%w: version %d flags %d", ErrMalformed, b[1], b[3])
	}
	p.Type = ProbeType(b[2])
	want := pingLen
	switch p.Type {
	case Ping:
	case Pong:
		want = pongLen
	default:
		return p, fmt.Errorf("%w: type %d", ErrMalformed, b[2])
	}
	if len(b) != want {
		return p, fmt.Errorf("%w: %s of %d bytes, want %d", ErrMalformed, p.Type, len(b), want)
	}
	copy(p.Sender[:], b[4:])
	copy(p.TxID[:], b[4+keyLen:])
	if p.Type == Pong {
		o := probeHdrLen
		a := netip.AddrFrom16([16]byte(b[o : o+16])).Unmap()
		p.Seen = netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[o+16:]))
	}
	return p, nil
}

// Open parses b and verifies its tag with the pair key that pairKey
// returns for the sender's public key (nil: unknown sender, no crypto done).
func Open(b []byte, pairKey func(sender [keyLen]byte) []byte) (Probe, error) {
	p, err := ParseProbe(b)
	if err != nil {
		return p, err
	}
	k := pairKey(p.Sender)
	if k == nil {
		return p, ErrUnknownKey
	}
	m := hmac.New(sha256.New, k)
	m.Write(b[:len(b)-tagLen])
	if !hmac.Equal(m.Sum(nil)[:tagLen], b[len(b)-tagLen:]) {
		return p, ErrBadTag
	}
	return p, nil
}

// Key is a host's probe key pair: X25519, made fresh at every start.
type Key struct {
	priv *ecdh.PrivateKey
	pub  [keyLen]byte
}

// NewKey makes a random key.
func NewKey() (*Key, error) {
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("path: probe key: %w", err)
	}
	return &Key{priv: priv, pub: [keyLen]byte(priv.PublicKey().Bytes())}, nil
}

// Public is the half to publish (TXT pk=).
func (k *Key) Public() [keyLen]byte { return k.pub }

func (k *Key) String() string { return "probe key (public " + fmt.Sprintf("%x", k.pub[:4]) + "…)" }

// PairKey derives the MAC key shared with the holder of peer (a 32-byte
// X25519 public key): HKDF-SHA-256 of the X25519 shared secret, salted with
// the protocol name, bound to both public keys in a fixed order.
func (k *Key) PairKey(peer []byte) ([]byte, error) {
	if len(peer) != keyLen {
		return nil, fmt.Errorf("path: peer probe key is %d bytes, want %d", len(peer), keyLen)
	}
	pub, err := ecdh.X25519().NewPublicKey(peer)
	if err != nil {
		return nil, fmt.Errorf("path: peer probe key: %w", err)
	}
	shared, err := k.priv.ECDH(pub) // fails for low-order points (all-zero secret)
	if err != nil {
		return nil, fmt.Errorf("path: peer probe key: %w", err)
	}
	lo, hi := k.pub[:], peer
	if string(lo) > string(hi) {
		lo, hi = hi, lo
	}
	info := append(append([]byte("btmm probe v1 "), lo...), hi...)
	return hkdf.Key(sha256.New, shared, []byte("btmm probe v1"), string(info), 32)
}
