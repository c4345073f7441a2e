package register

import (
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// Errors of ResponsePolicy.Check.
var (
	// ErrServerDoesNotSign: the server answered a signed request without a
	// signature (RFC 8945 §5.3 requires one); Apple's dnsextd never signs
	// its LLQ answers and events, AcceptUnsigned accepts that.
	ErrServerDoesNotSign = errors.New("server does not sign its responses")
	// ErrBadResponseSignature: a signed response that does not verify
	// (another key, another request's MAC, a forgery, or signed too far
	// from our clock).
	ErrBadResponseSignature = errors.New("response signature does not verify")
	// ErrKeyRefused: the server refused our TSIG (BADKEY, BADSIG: such
	// answers are unsigned by design, so they are only hints).
	ErrKeyRefused = errors.New("server refused our TSIG")
)

// ResponsePolicy is how this package's Registrar and dns/llqclient treat
// what a server sends back to a signed request (and LLQ events, signed with
// no request MAC): by default it must carry a TSIG of our key that verifies
// against our request (RFC 8945 §5.3) and was signed within its fudge of
// our clock. AcceptUnsigned is the per-server exception for a server that
// never signs (Apple's dnsextd): an unsigned answer is then believed; a
// signed one must still verify.
type ResponsePolicy struct {
	AcceptUnsigned bool
}

// Check decides whether raw, the answer to a request signed with k whose
// MAC was requestMAC ("" for an event), may be believed. With no key the
// request was unsigned and anything goes.
func (p ResponsePolicy) Check(k *Key, raw []byte, requestMAC string) error {
	if k == nil {
		return nil
	}
	secret, _ := base64.StdEncoding.DecodeString(k.Secret())
	ts, err := tsig.Key{Name: k.Name, Algorithm: k.Algorithm, Secret: secret}.VerifyResponse(raw, requestMAC)
	switch {
	case err == nil:
	case errors.Is(err, tsig.ErrUnsigned) && ts != nil && (ts.Error == dns.RcodeBadKey || ts.Error == dns.RcodeBadSig):
		if ts.Error == dns.RcodeBadSig {
			return fmt.Errorf("%w: BADSIG: the secret of key %s differs from the server's (is the key file the one btmm-dnsd printed for this host?)", ErrKeyRefused, k.Name)
		}
		return fmt.Errorf("%w: BADKEY: the server does not know key %s (was the host added with btmm-dnsd addhost or enroll?)", ErrKeyRefused, k.Name)
	case errors.Is(err, tsig.ErrUnsigned):
		if p.AcceptUnsigned {
			return nil
		}
		return fmt.Errorf("%w (RFC 8945 §5.3; for a server that never signs, such as Apple's dnsextd, set accept_unsigned)", ErrServerDoesNotSign)
	default:
		return fmt.Errorf("%w: %v", ErrBadResponseSignature, err)
	}
	fudge := max(time.Duration(ts.Fudge)*time.Second, time.Second)
	if d := time.Since(time.Unix(int64(ts.TimeSigned), 0)); d > fudge || d < -fudge {
		return fmt.Errorf("%w: signed %v from our clock (fudge %v)", ErrBadResponseSignature, d.Round(time.Second), fudge)
	}
	return nil
}
