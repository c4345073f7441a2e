package keying

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/btmm/btmm/controlplane"
)

// Version is the keying message format version this package speaks.
// Version 1 (no ephemeral key exchange) is refused with a clear error.
const Version = 2

// NonESPMarker is the RFC 3948 §2.2 prefix that tells the receiver of a
// datagram on the ESP-in-UDP port that it is not ESP (controlplane's).
var NonESPMarker = controlplane.NonESPMarker

// MsgType is the kind of a keying message.
type MsgType uint8

// Message types. INIT and RESP make the keys; CONFIRM/ACK tell the responder
// that the initiator has installed them (so the responder may switch its
// outbound SA and the peer's outer address); DELETE tears a pair down; ERROR
// reports why an INIT was refused (authenticated when the responder could
// authenticate the INIT, else only a hint). COOKIE is the responder's
// stateless answer under load (the initiator repeats its INIT with MAC2);
// FRAGMENT carries one piece of a message too long for one datagram.
// MOVED tells a keyed peer that the sender's outer address changed (its
// source address is the new one); MOVED_ACK confirms it. Both carry a MAC
// under the current SA pair's keying material: the peer moves the SAs to
// the new address (no rekey) only if it verifies.
const (
	MsgInit     MsgType = 1
	MsgResp     MsgType = 2
	MsgConfirm  MsgType = 3
	MsgAck      MsgType = 4
	MsgDelete   MsgType = 5
	MsgError    MsgType = 6
	MsgMoved    MsgType = 7
	MsgMovedAck MsgType = 8
	MsgCookie   MsgType = 9
	MsgFragment MsgType = 10
)

func (t MsgType) String() string {
	switch t {
	case MsgInit:
		return "INIT"
	case MsgResp:
		return "RESP"
	case MsgConfirm:
		return "CONFIRM"
	case MsgAck:
		return "ACK"
	case MsgDelete:
		return "DELETE"
	case MsgError:
		return "ERROR"
	case MsgMoved:
		return "MOVED"
	case MsgMovedAck:
		return "MOVED_ACK"
	case MsgCookie:
		return "COOKIE"
	case MsgFragment:
		return "FRAGMENT"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

func knownType(t MsgType) bool {
	return t >= MsgInit && t <= MsgFragment
}

// Mode is how the two hosts authenticate each other.
type Mode uint8

// Authentication modes.
const (
	ModeKerberos Mode = 1 // AP-REQ / AP-REP with the hosts' keytabs
	ModePSK      Mode = 2 // a shared secret file on both hosts
)

func (m Mode) String() string {
	switch m {
	case ModeKerberos:
		return "kerberos"
	case ModePSK:
		return "psk"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// CipherID is the on-wire number of an ESP transform.
type CipherID uint8

// Transforms that can be proposed.
const (
	CipherAES256GCM        CipherID = 1 // rfc4106(gcm(aes)), 32-byte key + 4-byte salt
	CipherAES256CBCHMAC256 CipherID = 2 // cbc(aes) 32-byte key + hmac(sha256) 32-byte key
)

// ErrorCode says why a responder refused an INIT.
type ErrorCode uint16

// Error codes carried in ERROR messages.
const (
	CodeAuthFailed    ErrorCode = 1 // the AP-REQ or MAC did not verify
	CodeClockSkew     ErrorCode = 2
	CodeReplay        ErrorCode = 3
	CodeTicketExpired ErrorCode = 4
	CodeWrongKeytab   ErrorCode = 5 // the responder's keytab has no key for the ticket
	CodeNoProposal    ErrorCode = 6
	CodeMalformed     ErrorCode = 7
	CodeUnknownPeer   ErrorCode = 8 // the sender's ULA or principal is not one of our peers
	CodeInternal      ErrorCode = 9 // e.g. the dataplane refused the SAs
	CodeWrongMode     ErrorCode = 10
)

// Attribute types; a message lists its attributes in increasing order, each
// at most once. MAC, MAC1 and MAC2 come last, in that order.
const (
	attrNonce     = 1
	attrSPI       = 2
	attrULA       = 3
	attrProposal  = 4
	attrCipher    = 5
	attrTime      = 6
	attrAPReq     = 7
	attrAPRep     = 8
	attrTicketEnd = 9
	attrError     = 10
	attrSPIs      = 11
	attrSeq       = 12 // MOVED, MOVED_ACK: announcement number
	attrX25519    = 13 // ephemeral X25519 public key (INIT, RESP)
	attrMLKEM     = 14 // ML-KEM-768 encapsulation key (INIT) or ciphertext (RESP)
	attrCookie    = 16 // COOKIE: sealed cookie
	attrFragment  = 17 // FRAGMENT: type of the whole message, index, count
	attrData      = 18 // FRAGMENT: this piece of the whole message
	attrMAC       = 253
	attrMAC1      = 254
	attrMAC2      = 255
)

// Sizes of fixed attributes.
const (
	headerLen    = 12 // version, type, mode, flags, 8-byte exchange ID
	nonceLen     = 32
	macLen       = 32
	cookieMACLen = 16 // MAC1, MAC2 and the cookie itself
	x25519Len    = 32
	mlkemEKLen   = 1184 // ML-KEM-768 encapsulation key
	mlkemCTLen   = 1088 // ML-KEM-768 ciphertext
	sealedLen    = 12 + cookieMACLen + 16
	// MaxMessageLen bounds a whole keying message (reassembled).
	MaxMessageLen = 8192
	// MaxDatagramLen bounds one keying datagram (without the 4-byte
	// non-ESP marker). With the marker, UDP and an IPv6 header (52 bytes)
	// it stays under the IPv6 minimum MTU of 1280, so no keying datagram
	// is ever fragmented by IP; longer messages are sent as FRAGMENTs.
	MaxDatagramLen = 1200
	// maxFragments bounds the pieces of one message.
	maxFragments = 8
)

// Fragment says which piece of which message a FRAGMENT carries.
type Fragment struct {
	Of           MsgType // the type of the whole message (INIT or RESP)
	Index, Count uint8   // 0 <= Index < Count <= 8
}

// Message is one keying message. The wire format (network byte order) is
//
//	version(1)=2 type(1) mode(1) flags(1)=0 exchange-id(8)
//	{ attr-type(1) attr-len(2) value }*   (types increasing, each once)
//
// Zero fields are absent from the encoding; an attribute that decodes to the
// zero value is malformed, so the encoding is canonical and
// Unmarshal(Marshal(m)) == m byte for byte.
//
// MAC (253) authenticates the message (see docs/keying.md for exactly what it
// covers). MAC1 (254) and MAC2 (255) are the datagram's cheap DoS checks
// (INIT and the FRAGMENTs of an INIT): they are not part of the message the
// transcript and the MAC see.
type Message struct {
	Type     MsgType
	Mode     Mode
	Exchange [8]byte // chosen by the initiator, echoed by the responder

	Nonce     []byte     // 32 random bytes (INIT, RESP)
	SPI       uint32     // the sender's inbound SPI (INIT, RESP)
	ULA       netip.Addr // the sender's ULA
	Proposal  []CipherID // INIT: transforms in order of preference
	Cipher    CipherID   // RESP: the chosen transform
	Time      int64      // PSK INIT: sender's clock, Unix seconds (replay window)
	APReq     []byte     // Kerberos INIT: KRB_AP_REQ (RFC 4120 §5.5.1)
	APRep     []byte     // Kerberos RESP: KRB_AP_REP (RFC 4120 §5.5.2)
	TicketEnd int64      // Kerberos RESP: the ticket's end time, Unix seconds
	Code      ErrorCode  // ERROR
	Text      string     // ERROR: human-readable reason (never secrets)
	SPIs      []uint32   // DELETE: the SPIs being deleted
	Seq       uint64     // MOVED, MOVED_ACK: the sender's announcement number for this SA pair
	X25519    []byte     // INIT, RESP: ephemeral X25519 public key (32 bytes)
	MLKEM     []byte     // INIT: ML-KEM-768 encapsulation key; RESP: ciphertext
	Cookie    []byte     // COOKIE: nonce(12) || AES-256-GCM(cookie(16)) with tag (16)
	Frag      Fragment   // FRAGMENT
	Data      []byte     // FRAGMENT: bytes [Index*n, ...) of the whole message
	MAC       []byte     // HMAC-SHA-256, 32 bytes
	MAC1      []byte     // 16 bytes
	MAC2      []byte     // 16 bytes
}

// Malformed-message errors.
var (
	errTruncated = errors.New("truncated")
	// errOldVersion: a version 1 peer (see refuseOldVersion).
	errOldVersion = errors.New("keying protocol version 1")
)

// Marshal encodes m. It fails on values that cannot be encoded (wrong nonce
// or MAC length, a 4-in-6 ULA, an oversized attribute).
func (m *Message) Marshal() ([]byte, error) {
	b := make([]byte, headerLen, 256)
	b[0] = Version
	b[1] = byte(m.Type)
	b[2] = byte(m.Mode)
	copy(b[4:12], m.Exchange[:])
	var err error
	attr := func(t byte, v []byte) {
		if err != nil {
			return
		}
		if len(v) > 0xffff {
			err = fmt.Errorf("attribute %d: %d bytes is too long", t, len(v))
			return
		}
		b = append(b, t)
		b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
		b = append(b, v...)
	}
	fixed := func(name string, v []byte, want ...int) error {
		for _, w := range want {
			if len(v) == w {
				return nil
			}
		}
		return fmt.Errorf("marshal %v: %s is %d bytes, want %v", m.Type, name, len(v), want)
	}
	if m.Nonce != nil {
		if err := fixed("nonce", m.Nonce, nonceLen); err != nil {
			return nil, err
		}
		attr(attrNonce, m.Nonce)
	}
	if m.SPI != 0 {
		attr(attrSPI, binary.BigEndian.AppendUint32(nil, m.SPI))
	}
	if m.ULA.IsValid() {
		if !m.ULA.Is6() || m.ULA.Is4In6() || m.ULA.Zone() != "" {
			return nil, fmt.Errorf("marshal %v: ULA %v is not a plain IPv6 address", m.Type, m.ULA)
		}
		a := m.ULA.As16()
		attr(attrULA, a[:])
	}
	if len(m.Proposal) > 0 {
		p := make([]byte, len(m.Proposal))
		for i, c := range m.Proposal {
			if c == 0 {
				return nil, fmt.Errorf("marshal %v: cipher 0 in proposal", m.Type)
			}
			p[i] = byte(c)
		}
		attr(attrProposal, p)
	}
	if m.Cipher != 0 {
		attr(attrCipher, []byte{byte(m.Cipher)})
	}
	if m.Time != 0 {
		attr(attrTime, binary.BigEndian.AppendUint64(nil, uint64(m.Time)))
	}
	if len(m.APReq) > 0 {
		attr(attrAPReq, m.APReq)
	}
	if len(m.APRep) > 0 {
		attr(attrAPRep, m.APRep)
	}
	if m.TicketEnd != 0 {
		attr(attrTicketEnd, binary.BigEndian.AppendUint64(nil, uint64(m.TicketEnd)))
	}
	if m.Code != 0 || m.Text != "" {
		if m.Code == 0 {
			return nil, fmt.Errorf("marshal %v: error text without a code", m.Type)
		}
		attr(attrError, append(binary.BigEndian.AppendUint16(nil, uint16(m.Code)), m.Text...))
	}
	if len(m.SPIs) > 0 {
		var v []byte
		for _, s := range m.SPIs {
			if s == 0 {
				return nil, fmt.Errorf("marshal %v: SPI 0 in list", m.Type)
			}
			v = binary.BigEndian.AppendUint32(v, s)
		}
		attr(attrSPIs, v)
	}
	if m.Seq != 0 {
		attr(attrSeq, binary.BigEndian.AppendUint64(nil, m.Seq))
	}
	if m.X25519 != nil {
		if err := fixed("X25519 share", m.X25519, x25519Len); err != nil {
			return nil, err
		}
		attr(attrX25519, m.X25519)
	}
	if m.MLKEM != nil {
		if err := fixed("ML-KEM value", m.MLKEM, mlkemEKLen, mlkemCTLen); err != nil {
			return nil, err
		}
		attr(attrMLKEM, m.MLKEM)
	}
	if m.Cookie != nil {
		if err := fixed("cookie", m.Cookie, sealedLen); err != nil {
			return nil, err
		}
		attr(attrCookie, m.Cookie)
	}
	if m.Frag != (Fragment{}) {
		if err := m.Frag.check(); err != nil {
			return nil, fmt.Errorf("marshal %v: %w", m.Type, err)
		}
		attr(attrFragment, []byte{byte(m.Frag.Of), m.Frag.Index, m.Frag.Count})
	}
	if len(m.Data) > 0 {
		attr(attrData, m.Data)
	}
	for _, a := range []struct {
		t    byte
		name string
		v    []byte
		n    int
	}{{attrMAC, "MAC", m.MAC, macLen}, {attrMAC1, "MAC1", m.MAC1, cookieMACLen}, {attrMAC2, "MAC2", m.MAC2, cookieMACLen}} {
		if a.v == nil {
			continue
		}
		if err := fixed(a.name, a.v, a.n); err != nil {
			return nil, err
		}
		attr(a.t, a.v)
	}
	if err != nil {
		return nil, fmt.Errorf("marshal %v: %w", m.Type, err)
	}
	if len(b) > MaxMessageLen {
		return nil, fmt.Errorf("marshal %v: %d bytes exceeds %d", m.Type, len(b), MaxMessageLen)
	}
	return b, nil
}

func (f Fragment) check() error {
	if f.Of != MsgInit && f.Of != MsgResp {
		return fmt.Errorf("fragment of a %v: only INIT and RESP are fragmented", f.Of)
	}
	if f.Count < 2 || f.Count > maxFragments || f.Index >= f.Count {
		return fmt.Errorf("fragment %d of %d (at most %d)", f.Index, f.Count, maxFragments)
	}
	return nil
}

// Unmarshal decodes b (without the non-ESP marker) into m. Every error wraps
// ErrMalformed; a version 1 message also wraps errOldVersion. m does not
// alias b.
func (m *Message) Unmarshal(b []byte) error {
	*m = Message{}
	if err := m.unmarshal(b); err != nil {
		*m = Message{}
		return fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return nil
}

func (m *Message) unmarshal(b []byte) error {
	if len(b) < headerLen {
		return fmt.Errorf("header: %w (%d bytes)", errTruncated, len(b))
	}
	if len(b) > MaxMessageLen {
		return fmt.Errorf("%d bytes exceeds %d", len(b), MaxMessageLen)
	}
	if b[0] == 1 {
		return fmt.Errorf("%w: this host speaks version %d", errOldVersion, Version)
	}
	if b[0] != Version {
		return fmt.Errorf("version %d, this host speaks %d", b[0], Version)
	}
	m.Type = MsgType(b[1])
	if !knownType(m.Type) {
		return fmt.Errorf("unknown message type %d", b[1])
	}
	m.Mode = Mode(b[2])
	if m.Mode != ModeKerberos && m.Mode != ModePSK {
		return fmt.Errorf("unknown mode %d", b[2])
	}
	if b[3] != 0 {
		return fmt.Errorf("reserved flags 0x%02x set", b[3])
	}
	copy(m.Exchange[:], b[4:12])
	last := -1
	for p := b[headerLen:]; len(p) > 0; {
		if len(p) < 3 {
			return fmt.Errorf("attribute header: %w", errTruncated)
		}
		t, n := int(p[0]), int(binary.BigEndian.Uint16(p[1:3]))
		if len(p) < 3+n {
			return fmt.Errorf("attribute %d: %w (%d of %d bytes)", t, errTruncated, len(p)-3, n)
		}
		v := p[3 : 3+n]
		p = p[3+n:]
		if t <= last {
			return fmt.Errorf("attribute %d after %d (out of order or repeated)", t, last)
		}
		last = t
		if n == 0 {
			return fmt.Errorf("attribute %d is empty", t)
		}
		fixed := func(want ...int) error {
			for _, w := range want {
				if n == w {
					return nil
				}
			}
			return fmt.Errorf("attribute %d is %d bytes, want %v", t, n, want)
		}
		clone := func() []byte { return append([]byte(nil), v...) }
		switch t {
		case attrNonce:
			if err := fixed(nonceLen); err != nil {
				return err
			}
			m.Nonce = clone()
		case attrSPI:
			if err := fixed(4); err != nil {
				return err
			}
			if m.SPI = binary.BigEndian.Uint32(v); m.SPI == 0 {
				return errors.New("SPI 0")
			}
		case attrULA:
			if err := fixed(16); err != nil {
				return err
			}
			m.ULA = netip.AddrFrom16([16]byte(v))
			if m.ULA.Is4In6() {
				return fmt.Errorf("ULA %v is IPv4-mapped", m.ULA)
			}
		case attrProposal:
			for _, c := range v {
				if c == 0 {
					return errors.New("cipher 0 in proposal")
				}
				m.Proposal = append(m.Proposal, CipherID(c))
			}
		case attrCipher:
			if err := fixed(1); err != nil {
				return err
			}
			m.Cipher = CipherID(v[0])
		case attrTime, attrTicketEnd:
			if err := fixed(8); err != nil {
				return err
			}
			x := int64(binary.BigEndian.Uint64(v))
			if x == 0 {
				return fmt.Errorf("attribute %d is zero", t)
			}
			if t == attrTime {
				m.Time = x
			} else {
				m.TicketEnd = x
			}
		case attrAPReq:
			m.APReq = clone()
		case attrAPRep:
			m.APRep = clone()
		case attrError:
			if n < 2 {
				return errors.New("error attribute shorter than its code")
			}
			if m.Code = ErrorCode(binary.BigEndian.Uint16(v)); m.Code == 0 {
				return errors.New("error code 0")
			}
			m.Text = string(v[2:])
		case attrSPIs:
			if n%4 != 0 {
				return fmt.Errorf("SPI list of %d bytes", n)
			}
			for i := 0; i < n; i += 4 {
				s := binary.BigEndian.Uint32(v[i:])
				if s == 0 {
					return errors.New("SPI 0 in list")
				}
				m.SPIs = append(m.SPIs, s)
			}
		case attrSeq:
			if err := fixed(8); err != nil {
				return err
			}
			if m.Seq = binary.BigEndian.Uint64(v); m.Seq == 0 {
				return errors.New("sequence number 0")
			}
		case attrX25519:
			if err := fixed(x25519Len); err != nil {
				return err
			}
			m.X25519 = clone()
		case attrMLKEM:
			if err := fixed(mlkemEKLen, mlkemCTLen); err != nil {
				return err
			}
			m.MLKEM = clone()
		case attrCookie:
			if err := fixed(sealedLen); err != nil {
				return err
			}
			m.Cookie = clone()
		case attrFragment:
			if err := fixed(3); err != nil {
				return err
			}
			m.Frag = Fragment{Of: MsgType(v[0]), Index: v[1], Count: v[2]}
			if err := m.Frag.check(); err != nil {
				return err
			}
		case attrData:
			m.Data = clone()
		case attrMAC:
			if err := fixed(macLen); err != nil {
				return err
			}
			m.MAC = clone()
		case attrMAC1, attrMAC2:
			if err := fixed(cookieMACLen); err != nil {
				return err
			}
			if t == attrMAC1 {
				m.MAC1 = clone()
			} else {
				m.MAC2 = clone()
			}
		default:
			return fmt.Errorf("unknown attribute %d", t)
		}
	}
	if m.MAC2 != nil && m.MAC1 == nil {
		return errors.New("MAC2 without MAC1")
	}
	return nil
}

// attrLen is the encoded size of an attribute with an n-byte value.
func attrLen(n int) int { return 3 + n }

// messagePart returns the bytes of an encoded datagram that are the message
// itself: everything before MAC1 (MAC1 and MAC2 belong to the datagram).
// It assumes b was accepted by Unmarshal into m.
func messagePart(m *Message, b []byte) []byte {
	n := len(b)
	if m.MAC2 != nil {
		n -= attrLen(cookieMACLen)
	}
	if m.MAC1 != nil {
		n -= attrLen(cookieMACLen)
	}
	return b[:n]
}

// signedPart returns the bytes of an encoded message (without MAC1/MAC2)
// that its MAC covers: everything before the MAC attribute's type byte.
func signedPart(msg []byte) []byte { return msg[:len(msg)-attrLen(macLen)] }
