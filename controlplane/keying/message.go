package keying

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// Version is the keying message format version this package speaks.
const Version = 1

// NonESPMarker is the RFC 3948 §2.2 prefix that tells the receiver of a
// datagram on the ESP-in-UDP port that it is not ESP (an ESP SPI is never 0).
var NonESPMarker = [4]byte{}

// MsgType is the kind of a keying message.
type MsgType uint8

// Message types. INIT and RESP make the keys; CONFIRM/ACK tell the responder
// that the initiator has installed them (so the responder may switch its
// outbound SA without losing packets); DELETE tears a pair down; ERROR
// reports why an INIT was refused (unauthenticated: a hint, never trusted).
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
	}
	return fmt.Sprintf("type(%d)", uint8(t))
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
// at most once, and MAC (when present) last.
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
	attrSeq       = 12
	attrMAC       = 255
)

const (
	headerLen = 12 // version, type, mode, flags, 8-byte exchange ID
	nonceLen  = 32
	macLen    = 32
	// MaxMessageLen bounds a keying datagram (an AP-REQ is well under 2 KiB).
	MaxMessageLen = 8192
)

// Message is one keying message. The wire format (network byte order) is
//
//	version(1) type(1) mode(1) flags(1)=0 exchange-id(8)
//	{ attr-type(1) attr-len(2) value }*   (types increasing, each once, MAC last)
//
// Zero fields are absent from the encoding; an attribute that decodes to the
// zero value is malformed, so the encoding is canonical and
// Unmarshal(Marshal(m)) == m byte for byte. The MAC, when present, covers
// every byte before its own attribute header.
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
	MAC       []byte     // HMAC-SHA-256, 32 bytes
}

// Malformed-message errors.
var errTruncated = errors.New("truncated")

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
	if m.Nonce != nil {
		if len(m.Nonce) != nonceLen {
			return nil, fmt.Errorf("marshal %v: nonce is %d bytes, want %d", m.Type, len(m.Nonce), nonceLen)
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
	if m.MAC != nil {
		if len(m.MAC) != macLen {
			return nil, fmt.Errorf("marshal %v: MAC is %d bytes, want %d", m.Type, len(m.MAC), macLen)
		}
		attr(attrMAC, m.MAC)
	}
	if err != nil {
		return nil, fmt.Errorf("marshal %v: %w", m.Type, err)
	}
	if len(b) > MaxMessageLen {
		return nil, fmt.Errorf("marshal %v: %d bytes exceeds %d", m.Type, len(b), MaxMessageLen)
	}
	return b, nil
}

// Unmarshal decodes b (without the non-ESP marker) into m. Every error wraps
// ErrMalformed. m does not alias b.
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
	if b[0] != Version {
		return fmt.Errorf("version %d, this host speaks %d", b[0], Version)
	}
	m.Type = MsgType(b[1])
	if m.Type < MsgInit || m.Type > MsgMovedAck {
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
		fixed := func(want int) error {
			if n != want {
				return fmt.Errorf("attribute %d is %d bytes, want %d", t, n, want)
			}
			return nil
		}
		switch t {
		case attrNonce:
			if err := fixed(nonceLen); err != nil {
				return err
			}
			m.Nonce = append([]byte(nil), v...)
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
			m.APReq = append([]byte(nil), v...)
		case attrAPRep:
			m.APRep = append([]byte(nil), v...)
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
		case attrMAC:
			if err := fixed(macLen); err != nil {
				return err
			}
			if len(p) != 0 {
				return errors.New("data after MAC")
			}
			m.MAC = append([]byte(nil), v...)
		default:
			return fmt.Errorf("unknown attribute %d", t)
		}
	}
	return nil
}

// signedPart returns the bytes of an encoded message that its MAC covers.
// It assumes b was accepted by Unmarshal and carries a MAC.
func signedPart(b []byte) []byte { return b[:len(b)-3-macLen] }
