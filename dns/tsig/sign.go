package tsig

import (
	"crypto/hmac"
	"encoding/binary"
	"errors"
	"hash"
	"strings"

	"github.com/miekg/dns"
)

// Signer signs packed DNS messages with one key (RFC 8945 §4.3: the MAC over
// the message and the TSIG variables, then the TSIG record appended). It is
// the fast path for unsolicited messages a server sends many of, such as LLQ
// events: the key's HMAC state and the wire forms of the key and algorithm
// names are prepared once, and each Sign is one HMAC over the bytes with no
// parsing. The output is byte for byte what miekg/dns's
// TsigGenerateWithProvider produces for the same message without a request
// MAC. A Signer is not safe for concurrent use.
type Signer struct {
	mac  hash.Hash
	name []byte // key name, wire form, lower case, uncompressed
	alg  []byte // algorithm name, likewise
	size int    // MAC size
	buf  [10]byte
}

var (
	classAnyTTL0 = [6]byte{0, byte(dns.ClassANY)}
	zero4        [4]byte
)

// ErrShortMessage: what Sign was given is not a DNS message.
var ErrShortMessage = errors.New("tsig: sign: message shorter than a DNS header")

// Signer returns a Signer for k.
func (k Key) Signer() (*Signer, error) {
	h, size, err := newHash(k.Algorithm)
	if err != nil {
		return nil, err
	}
	name, err := wireName(k.Name)
	if err != nil {
		return nil, err
	}
	alg, err := wireName(k.Algorithm)
	if err != nil {
		return nil, err
	}
	return &Signer{mac: hmac.New(h, k.Secret), name: name, alg: alg, size: size}, nil
}

func wireName(n string) ([]byte, error) {
	b := make([]byte, 256)
	off, err := dns.PackDomainName(strings.ToLower(dns.CanonicalName(n)), b, 0, nil, false)
	if err != nil {
		return nil, err
	}
	return b[:off], nil
}

// Sign appends to dst msg signed at timeSigned (seconds since the epoch)
// with fudge seconds: msg as it is (its ID is the Original ID), ARCOUNT one
// more, then the TSIG record. msg is not modified.
func (s *Signer) Sign(dst, msg []byte, timeSigned uint64, fudge uint16) ([]byte, error) {
	if len(msg) < 12 {
		return dst, ErrShortMessage
	}
	// TSIG variables (§4.3.3): key name, class ANY, TTL 0, algorithm name,
	// time signed (48 bits), fudge, error 0, other length 0.
	s.mac.Reset()
	s.mac.Write(msg)
	s.mac.Write(s.name)
	s.mac.Write(classAnyTTL0[:])
	s.mac.Write(s.alg)
	t := s.buf[:]
	binary.BigEndian.PutUint16(t[0:], uint16(timeSigned>>32))
	binary.BigEndian.PutUint32(t[2:], uint32(timeSigned))
	binary.BigEndian.PutUint16(t[6:], fudge)
	s.mac.Write(t[:8])
	s.mac.Write(zero4[:])

	start := len(dst)
	dst = append(dst, msg...)
	binary.BigEndian.PutUint16(dst[start+10:], binary.BigEndian.Uint16(msg[10:])+1)
	// The TSIG record: owner, TYPE, CLASS ANY, TTL 0, RDLENGTH, RDATA.
	dst = append(dst, s.name...)
	rdlen := len(s.alg) + 6 + 2 + 2 + s.size + 2 + 2 + 2
	dst = append(dst, 0, byte(dns.TypeTSIG), 0, byte(dns.ClassANY), 0, 0, 0, 0, byte(rdlen>>8), byte(rdlen))
	dst = append(dst, s.alg...)
	dst = append(dst, t[:8]...)
	dst = binary.BigEndian.AppendUint16(dst, uint16(s.size))
	dst = s.mac.Sum(dst)
	dst = append(dst, msg[0], msg[1])   // Original ID
	return append(dst, 0, 0, 0, 0), nil // error 0, other length 0
}
