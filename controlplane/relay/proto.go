package relay

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/miekg/dns"
	"github.com/pion/stun/v3"

	"github.com/btmm/btmm/controlplane"
)

// Methods and attributes beyond RFC 8489/8656.
const (
	MethodBind stun.Method   = 0xB07  // btmm: register a source for a peer's allocation
	AttrTime   stun.AttrType = 0xC0B1 // BTMM-TIME: Unix seconds, 8 bytes
	AttrHost   stun.AttrType = 0xC0B2 // BTMM-HOST: the host's domain name
)

// NonESPMarker prefixes every datagram between a host's tunnel socket and
// the relay (RFC 3948 §2.2; controlplane's).
var NonESPMarker = controlplane.NonESPMarker[:]

// Errors the client returns for the relay's refusals (errors.Is).
var (
	ErrUnauthorized = errors.New("relay: unauthorized (unknown key or bad signature)")
	ErrForbidden    = errors.New("relay: forbidden (the key may not act for that host or user)")
	ErrQuota        = errors.New("relay: allocation quota reached")
	ErrMismatch     = errors.New("relay: no such allocation")
	ErrStale        = errors.New("relay: request time outside the window (check the clock)")
	ErrBadRequest   = errors.New("relay: bad request")
	ErrNoAnswer     = errors.New("relay: no answer")
)

func codeErr(c stun.ErrorCode) error {
	switch c {
	case stun.CodeUnauthorized:
		return ErrUnauthorized
	case stun.CodeForbidden:
		return ErrForbidden
	case stun.CodeAllocQuotaReached:
		return ErrQuota
	case stun.CodeAllocMismatch:
		return ErrMismatch
	case stun.CodeStaleNonce:
		return ErrStale
	}
	return fmt.Errorf("%w (code %d)", ErrBadRequest, c)
}

// Credential is what signs requests: a TSIG key's name and secret.
type Credential struct {
	Name   string // canonical key name, e.g. "alice.btmm.example."
	Secret []byte
}

func (c Credential) String() string { return "relay credential " + c.Name + " (secret redacted)" }

// macKey separates the relay's use of a TSIG secret from DNS's.
func (c Credential) macKey() []byte {
	k, err := hkdf.Key(sha256.New, c.Secret, []byte("btmm relay v1"), dns.CanonicalName(c.Name), 32)
	if err != nil {
		panic(err) // only for lengths sha256 cannot produce
	}
	return k
}

const (
	miSHA256Len = 32
	attrHdrLen  = 4
	stunHdrLen  = 20
)

// addIntegrity appends MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6): HMAC over
// the message up to the attribute, with the length field covering it.
func addIntegrity(m *stun.Message, key []byte) {
	length := m.Length
	m.Length += miSHA256Len + attrHdrLen
	m.WriteLength()
	h := hmac.New(sha256.New, key)
	h.Write(m.Raw)
	sum := h.Sum(nil)
	m.Length = length
	m.Add(stun.AttrMessageIntegritySHA256, sum)
}

// checkIntegrity verifies MESSAGE-INTEGRITY-SHA256; it must be the last
// attribute (nothing after it is covered, so nothing after it is accepted).
func checkIntegrity(m *stun.Message, key []byte) error {
	if len(m.Attributes) == 0 || m.Attributes[len(m.Attributes)-1].Type != stun.AttrMessageIntegritySHA256 {
		return errors.New("no MESSAGE-INTEGRITY-SHA256 at the end")
	}
	val := m.Attributes[len(m.Attributes)-1].Value
	end := len(m.Raw) - attrHdrLen - miSHA256Len
	if len(val) != miSHA256Len || end < stunHdrLen {
		return errors.New("bad MESSAGE-INTEGRITY-SHA256")
	}
	b := append([]byte(nil), m.Raw[:end]...)
	binary.BigEndian.PutUint16(b[2:], uint16(len(m.Raw)-stunHdrLen))
	h := hmac.New(sha256.New, key)
	h.Write(b)
	if !hmac.Equal(h.Sum(nil), val) {
		return errors.New("MESSAGE-INTEGRITY-SHA256 does not verify")
	}
	return nil
}

// request is what a client asks.
type request struct {
	method   stun.Method
	txid     [stun.TransactionIDSize]byte
	host     string
	time     time.Time
	lifetime time.Duration
	alloc    netip.AddrPort // Refresh: which; Bind: the sender's own
	hasLife  bool
}

func addAddr(m *stun.Message, t stun.AttrType, ap netip.AddrPort) error {
	a := stun.XORMappedAddress{IP: net.IP(ap.Addr().AsSlice()), Port: int(ap.Port())}
	return a.AddToAs(m, t)
}

func getAddr(m *stun.Message, t stun.AttrType) (netip.AddrPort, error) {
	var a stun.XORMappedAddress
	if err := a.GetFromAs(m, t); err != nil {
		return netip.AddrPort{}, err
	}
	ip, ok := netip.AddrFromSlice(a.IP)
	if !ok || a.Port <= 0 || a.Port > 65535 {
		return netip.AddrPort{}, errors.New("bad address attribute")
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port)), nil
}

// buildRequest encodes a signed request (Allocate, Refresh, Bind).
func buildRequest(cred Credential, r request) ([]byte, error) {
	m := stun.New()
	m.TransactionID = r.txid
	m.SetType(stun.NewType(r.method, stun.ClassRequest))
	m.WriteHeader()
	stun.NewUsername(cred.Name).AddTo(m)
	m.Add(AttrHost, []byte(dns.CanonicalName(r.host)))
	m.Add(AttrTime, binary.BigEndian.AppendUint64(nil, uint64(r.time.Unix())))
	if r.hasLife {
		m.Add(stun.AttrLifetime, binary.BigEndian.AppendUint32(nil, uint32(r.lifetime/time.Second)))
	}
	if r.alloc.IsValid() {
		if err := addAddr(m, stun.AttrXORRelayedAddress, r.alloc); err != nil {
			return nil, err
		}
	}
	addIntegrity(m, cred.macKey())
	return m.Raw, nil
}

// parseRequest decodes a request's fields (not its signature).
func parseRequest(m *stun.Message) (request, string, error) {
	r := request{method: m.Type.Method, txid: m.TransactionID}
	var user stun.Username
	if err := user.GetFrom(m); err != nil {
		return r, "", fmt.Errorf("no USERNAME: %w", err)
	}
	h, err := m.Get(AttrHost)
	if err != nil {
		return r, "", errors.New("no BTMM-HOST")
	}
	if _, ok := dns.IsDomainName(string(h)); !ok || len(h) == 0 {
		return r, "", errors.New("BTMM-HOST is not a domain name")
	}
	r.host = dns.CanonicalName(string(h))
	t, err := m.Get(AttrTime)
	if err != nil || len(t) != 8 {
		return r, "", errors.New("no BTMM-TIME")
	}
	r.time = time.Unix(int64(binary.BigEndian.Uint64(t)), 0)
	if l, err := m.Get(stun.AttrLifetime); err == nil {
		if len(l) != 4 {
			return r, "", errors.New("bad LIFETIME")
		}
		r.lifetime, r.hasLife = time.Duration(binary.BigEndian.Uint32(l))*time.Second, true
	}
	if m.Contains(stun.AttrXORRelayedAddress) {
		if r.alloc, err = getAddr(m, stun.AttrXORRelayedAddress); err != nil {
			return r, "", err
		}
	}
	return r, dns.CanonicalName(string(user)), nil
}

// decode parses a STUN message (marker already removed).
func decode(b []byte) (*stun.Message, error) {
	m := &stun.Message{Raw: append([]byte(nil), b...)}
	if err := m.Decode(); err != nil {
		return nil, fmt.Errorf("relay: decode STUN: %w", err)
	}
	return m, nil
}
