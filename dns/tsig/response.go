package tsig

import (
	"crypto/hmac"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/dns"
)

// Errors of VerifyResponse.
var (
	// ErrUnsigned: a response to a signed request carries no TSIG (RFC 8945
	// §5.3: a server must sign it).
	ErrUnsigned = errors.New("tsig: response is not signed")
	// ErrResponseMAC: the response's TSIG names another key or its MAC does
	// not verify against our request.
	ErrResponseMAC = errors.New("tsig: response signature does not verify")
)

// VerifyResponse checks the TSIG of raw, a response to a request signed
// with k whose MAC was requestMAC (hex; "" for an unsolicited message such
// as an LLQ event): it must name k, use its algorithm and carry the full
// MAC of RFC 8945 §4.3.3. Unlike miekg/dns it also verifies error answers
// (RCODE NOTAUTH with BADTIME or BADTRUNC are signed, §5.3.2). It returns
// the response's TSIG (its Error field is the server's TSIG error); a
// BADKEY or BADSIG answer is unsigned by design and returns ErrUnsigned
// wrapped with the error. Time is not checked: the caller knows whether it
// sent the request.
func (k Key) VerifyResponse(raw []byte, requestMAC string) (*dns.TSIG, error) {
	stripped, t, err := stripTSIG(raw)
	if err != nil {
		return nil, err
	}
	if t == nil {
		return nil, ErrUnsigned
	}
	if t.MACSize == 0 && (t.Error == dns.RcodeBadKey || t.Error == dns.RcodeBadSig) {
		return t, fmt.Errorf("%w (server: %s)", ErrUnsigned, dns.RcodeToString[int(t.Error)])
	}
	if dns.CanonicalName(t.Hdr.Name) != dns.CanonicalName(k.Name) || dns.CanonicalName(t.Algorithm) != dns.CanonicalName(k.Algorithm) {
		return t, fmt.Errorf("%w: signed with key %s (%s)", ErrResponseMAC, t.Hdr.Name, t.Algorithm)
	}
	buf, err := macInput(stripped, t, requestMAC)
	if err != nil {
		return t, err
	}
	want, err := k.MAC(buf)
	if err != nil {
		return t, err
	}
	got, err := hex.DecodeString(t.MAC)
	if err != nil || !hmac.Equal(want, got) {
		return t, ErrResponseMAC
	}
	return t, nil
}

// stripTSIG returns the message without its TSIG (ID set back to the
// TSIG's Original ID, ARCOUNT one less) and the TSIG, or nil when the last
// additional record is not a TSIG.
func stripTSIG(raw []byte) ([]byte, *dns.TSIG, error) {
	if len(raw) < 12 {
		return nil, nil, errors.New("tsig: message too short")
	}
	qd, an, ns, ar := binary.BigEndian.Uint16(raw[4:]), binary.BigEndian.Uint16(raw[6:]), binary.BigEndian.Uint16(raw[8:]), binary.BigEndian.Uint16(raw[10:])
	if ar == 0 {
		return nil, nil, nil
	}
	off := 12
	var err error
	for range qd {
		if _, off, err = dns.UnpackDomainName(raw, off); err != nil {
			return nil, nil, fmt.Errorf("tsig: parse question: %w", err)
		}
		off += 4
		if off > len(raw) {
			return nil, nil, errors.New("tsig: truncated question")
		}
	}
	var last int
	var rr dns.RR
	for i := 0; i < int(an)+int(ns)+int(ar); i++ {
		last = off
		if rr, off, err = dns.UnpackRR(raw, off); err != nil {
			return nil, nil, fmt.Errorf("tsig: parse record: %w", err)
		}
	}
	t, ok := rr.(*dns.TSIG)
	if !ok {
		return nil, nil, nil
	}
	out := append([]byte(nil), raw[:last]...)
	binary.BigEndian.PutUint16(out[0:], t.OrigId)
	binary.BigEndian.PutUint16(out[10:], ar-1)
	return out, t, nil
}

// macInput is what the MAC covers (RFC 8945 §4.3.3): the request MAC (with
// its length) when there is one, the stripped message, the TSIG variables.
func macInput(stripped []byte, t *dns.TSIG, requestMAC string) ([]byte, error) {
	var buf []byte
	if requestMAC != "" {
		mac, err := hex.DecodeString(requestMAC)
		if err != nil {
			return nil, fmt.Errorf("tsig: request MAC: %w", err)
		}
		buf = binary.BigEndian.AppendUint16(buf, uint16(len(mac)))
		buf = append(buf, mac...)
	}
	buf = append(buf, stripped...)
	vars := make([]byte, 2*256+32+len(t.OtherData))
	off, err := dns.PackDomainName(strings.ToLower(dns.CanonicalName(t.Hdr.Name)), vars, 0, nil, false)
	if err != nil {
		return nil, err
	}
	binary.BigEndian.PutUint16(vars[off:], dns.ClassANY)
	binary.BigEndian.PutUint32(vars[off+2:], 0)
	off += 6
	if off, err = dns.PackDomainName(strings.ToLower(dns.CanonicalName(t.Algorithm)), vars, off, nil, false); err != nil {
		return nil, err
	}
	other, err := hex.DecodeString(t.OtherData)
	if err != nil {
		return nil, fmt.Errorf("tsig: other data: %w", err)
	}
	var ts [8]byte
	binary.BigEndian.PutUint64(ts[:], t.TimeSigned)
	off += copy(vars[off:], ts[2:])
	binary.BigEndian.PutUint16(vars[off:], t.Fudge)
	binary.BigEndian.PutUint16(vars[off+2:], t.Error)
	binary.BigEndian.PutUint16(vars[off+4:], uint16(len(other)))
	off += 6
	off += copy(vars[off:], other)
	return append(buf, vars[:off]...), nil
}
