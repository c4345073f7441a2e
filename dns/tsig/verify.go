package tsig

import (
	"crypto/hmac"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// DefaultFudge is the server's fudge (RFC 8945 §5.2.3 recommends 300 s).
const DefaultFudge = 300 * time.Second

// DefaultMaxSeen bounds the MACs remembered per key for replay detection
// (about 50 bytes each): a key may sign this many messages inside the time
// window before its oldest are forgotten.
const DefaultMaxSeen = 65536

// VerifyError is why a request's TSIG was not accepted (RFC 8945 §5.2). It
// carries what the error response needs. Code is the TSIG error (BADKEY,
// BADSIG, BADTIME, BADTRUNC) answered with RCODE NOTAUTH; Rcode is FORMERR
// for a TSIG that is malformed (§5.2.2.1: a MAC longer than the hash or
// shorter than its minimum), with Code 0.
type VerifyError struct {
	Code   uint16
	Rcode  int
	Reason string
	// ServerTime is the server's time, for BADTIME's Other Data.
	ServerTime time.Time
}

func (e *VerifyError) Error() string {
	if e.Code != 0 {
		return fmt.Sprintf("tsig: %s: %s", dns.RcodeToString[int(e.Code)], e.Reason)
	}
	return fmt.Sprintf("tsig: %s: %s", dns.RcodeToString[e.Rcode], e.Reason)
}

// Signed reports whether the error response is signed: BADTIME and
// BADTRUNC are (the MAC was good), BADKEY and BADSIG and FORMERR are not
// (RFC 8945 §5.3.2).
func (e *VerifyError) Signed() bool {
	return e.Code == dns.RcodeBadTime || e.Code == dns.RcodeBadTrunc
}

// Verifier checks the TSIG of requests arriving at a server, in the order of
// RFC 8945 §5.2: the key and its algorithm (BADKEY), the MAC (BADSIG; a MAC
// size outside §5.2.2.1's bounds is FORMERR), the time (BADTIME) and the
// truncation (BADTRUNC: we accept only full-length MACs, §5.2.4).
//
// Time: the window is the smaller of the signer's fudge and the server's
// (Fudge), so a signer cannot widen it (a fudge of 65535 s does not make an
// hour-old signature acceptable).
//
// Replays (§5.2.3 asks servers to remember the last Time Signed of each
// key): the Verifier remembers, per key, the MAC of every message it
// accepted whose time is still inside the window, and refuses a message whose
// MAC it has already seen with BADTIME. An exact replay carries the same
// MAC, so this refuses every replay that the RFC's "not earlier than the
// last Time Signed" rule would, without refusing fresh messages that merely
// arrive out of order: several hosts sharing a user key (as RFC 6281 deploys
// them), or a host's update and LLQ clients, sign with clocks and sockets of
// their own. When a key's memory is full (MaxSeen MACs inside the window) the
// oldest are forgotten and everything signed at or before them is refused;
// messages signed before the Verifier was created are refused too (the MACs
// a previous server process accepted are not remembered). A copy arriving
// while the first is still being handled (Done not yet called) is a
// client's retransmission: Verify returns ErrRetransmission and the caller
// drops it.
type Verifier struct {
	Keys    *Keyring
	Fudge   time.Duration    // default DefaultFudge
	Now     func() time.Time // default time.Now
	MaxSeen int              // per key; default DefaultMaxSeen

	once  sync.Once
	mu    sync.Mutex
	start uint64
	seen  map[string]*replay
}

// NewVerifier returns a Verifier whose start (before which messages are
// refused as possible replays) is now. A zero Verifier starts at its first
// Verify.
func NewVerifier(keys *Keyring, fudge time.Duration, now func() time.Time) *Verifier {
	v := &Verifier{Keys: keys, Fudge: fudge, Now: now}
	v.init()
	return v
}

// replay is one key's memory: the MACs (their first 16 octets) it accepted
// inside the window, in a map for lookup and a FIFO in arrival order for
// pruning and eviction (Time Signed is nearly in arrival order), so each
// message costs O(1).
type replay struct {
	floor uint64 // Time Signed at or below it is refused
	macs  map[macID]seenMAC
	order []macAt
	head  int
}

type macID [16]byte

type macAt struct {
	ts  uint64
	mac macID
}

type seenMAC struct {
	ts       uint64 // Time Signed
	inFlight bool   // accepted, Done not called yet
}

func idOf(t *dns.TSIG) macID {
	var id macID
	b, _ := hex.DecodeString(t.MAC) // checked by the verification
	copy(id[:], b)
	return id
}

// pop drops the oldest remembered MAC.
func (r *replay) pop() macAt {
	a := r.order[r.head]
	r.head++
	if s, ok := r.macs[a.mac]; ok && s.ts == a.ts {
		delete(r.macs, a.mac)
	}
	if r.head > 1024 && r.head*2 > len(r.order) {
		r.order = append(r.order[:0], r.order[r.head:]...)
		r.head = 0
	}
	return a
}

// ErrRetransmission is returned by Verify for a copy of a message that is
// still being handled (a client's retransmission while, say, an UPDATE
// waits for its fsync): drop it, the answer to the first copy is coming.
var ErrRetransmission = errors.New("tsig: retransmission of a message in progress")

func (v *Verifier) init() {
	v.once.Do(func() {
		if v.Fudge <= 0 {
			v.Fudge = DefaultFudge
		}
		if v.Now == nil {
			v.Now = time.Now
		}
		if v.MaxSeen <= 0 {
			v.MaxSeen = DefaultMaxSeen
		}
		v.seen = map[string]*replay{}
		v.start = uint64(v.Now().Unix())
	})
}

// errFormat marks a MAC size outside RFC 8945 §5.2.2.1's bounds.
var errFormat = errors.New("tsig: MAC size out of bounds")

// checker is the dns.TsigProvider handed to miekg/dns for one verification:
// it compares (possibly truncated) MACs and records what it found.
type checker struct {
	keys      *Keyring
	ok        bool
	truncated bool
}

func (c *checker) Generate(msg []byte, t *dns.TSIG) ([]byte, error) { return c.keys.Generate(msg, t) }

func (c *checker) Verify(msg []byte, t *dns.TSIG) error {
	want, err := c.keys.Generate(msg, t)
	if err != nil {
		return err
	}
	got, err := hex.DecodeString(t.MAC)
	if err != nil {
		return dns.ErrSig
	}
	if len(got) > len(want) || len(got) < max(10, len(want)/2) {
		return errFormat
	}
	if !hmac.Equal(want[:len(got)], got) {
		return dns.ErrSig
	}
	c.ok, c.truncated = true, len(got) < len(want)
	return nil
}

// Verify checks the TSIG t of the message raw (t is raw's last additional
// record, already parsed). It returns the canonical key name, or a
// *VerifyError. raw is modified: do not use it afterwards.
func (v *Verifier) Verify(raw []byte, t *dns.TSIG) (string, error) {
	v.init()
	now := v.Now()
	fail := func(code uint16, rcode int, format string, args ...any) (string, error) {
		return "", &VerifyError{Code: code, Rcode: rcode, Reason: fmt.Sprintf(format, args...), ServerTime: now}
	}
	c := &checker{keys: v.Keys}
	err := dns.TsigVerifyWithProvider(raw, c, "", false)
	if !c.ok {
		switch {
		case errors.Is(err, dns.ErrSecret):
			return fail(dns.RcodeBadKey, dns.RcodeNotAuth, "unknown key %q", t.Hdr.Name)
		case errors.Is(err, dns.ErrKeyAlg):
			return fail(dns.RcodeBadKey, dns.RcodeNotAuth, "key %q is not for algorithm %s", t.Hdr.Name, t.Algorithm)
		case errors.Is(err, dns.ErrSig):
			return fail(dns.RcodeBadSig, dns.RcodeNotAuth, "MAC does not verify with key %q", t.Hdr.Name)
		case errors.Is(err, errFormat):
			return fail(0, dns.RcodeFormatError, "MAC of %d octets for %s", t.MACSize, t.Algorithm)
		}
		return fail(0, dns.RcodeFormatError, "malformed TSIG: %v", err)
	}
	// The MAC is good; miekg/dns's own time check (the signer's fudge,
	// the process clock) is replaced by ours.
	key := dns.CanonicalName(t.Hdr.Name)
	nowS := uint64(now.Unix())
	fudge := min(uint64(t.Fudge), uint64(v.Fudge/time.Second))
	skew := max(nowS, t.TimeSigned) - min(nowS, t.TimeSigned)
	if skew > fudge {
		return fail(dns.RcodeBadTime, dns.RcodeNotAuth, "time signed %d is %d s from the server's %d (fudge %d s)", t.TimeSigned, skew, nowS, fudge)
	}
	if c.truncated {
		return fail(dns.RcodeBadTrunc, dns.RcodeNotAuth, "MAC truncated to %d octets; full length required", t.MACSize)
	}
	if err := v.remember(key, t, nowS); err != "" {
		if err == inFlight {
			return "", ErrRetransmission
		}
		return fail(dns.RcodeBadTime, dns.RcodeNotAuth, "%s", err)
	}
	return key, nil
}

const inFlight = "in flight"

// Done marks an accepted message as answered: a copy arriving from now on
// is a replay (BADTIME), no longer a retransmission to drop.
func (v *Verifier) Done(key string, t *dns.TSIG) {
	v.init()
	v.mu.Lock()
	defer v.mu.Unlock()
	if r := v.seen[dns.CanonicalName(key)]; r != nil {
		id := idOf(t)
		if s, ok := r.macs[id]; ok {
			s.inFlight = false
			r.macs[id] = s
		}
	}
}

// remember records an accepted MAC; it returns a reason when the message
// is (or may be) a replay.
func (v *Verifier) remember(key string, t *dns.TSIG, now uint64) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	if t.TimeSigned < v.start {
		return "signed before the server started (possible replay)"
	}
	r := v.seen[key]
	if r == nil {
		r = &replay{macs: map[macID]seenMAC{}}
		v.seen[key] = r
	}
	// Forget what is out of the window: the time check refuses it anyway.
	horizon := now - min(now, uint64(v.Fudge/time.Second))
	for r.head < len(r.order) && r.order[r.head].ts < horizon {
		r.pop()
	}
	if t.TimeSigned <= r.floor {
		return "signed at or before a forgotten message of this key (possible replay)"
	}
	id := idOf(t)
	if s, dup := r.macs[id]; dup {
		if s.inFlight {
			return inFlight
		}
		return "replay of an earlier message"
	}
	for len(r.macs) >= v.MaxSeen && r.head < len(r.order) {
		r.floor = max(r.floor, r.pop().ts)
	}
	if t.TimeSigned <= r.floor {
		return "signed at or before a forgotten message of this key (possible replay)"
	}
	r.macs[id] = seenMAC{ts: t.TimeSigned, inFlight: true}
	r.order = append(r.order, macAt{t.TimeSigned, id})
	return ""
}

// Forget drops the replay state of a key (after it was removed).
func (v *Verifier) Forget(key string) {
	v.init()
	v.mu.Lock()
	delete(v.seen, dns.CanonicalName(key))
	v.mu.Unlock()
}

// ErrorTSIG returns the TSIG record for the response to a request whose
// TSIG failed with e (RFC 8945 §5.3.2): BADTIME carries the request's Time
// Signed and the server's time in Other Data; a signed error (BADTIME,
// BADTRUNC) must then be generated with the request's MAC. id is the
// response's message ID.
func ErrorTSIG(req *dns.TSIG, id uint16, e *VerifyError, fudge time.Duration) *dns.TSIG {
	if fudge <= 0 {
		fudge = DefaultFudge
	}
	t := &dns.TSIG{
		Hdr:       dns.RR_Header{Name: req.Hdr.Name, Rrtype: dns.TypeTSIG, Class: dns.ClassANY},
		Algorithm: req.Algorithm,
		Fudge:     uint16(min(fudge/time.Second, 0xffff)),
		Error:     e.Code,
		OrigId:    id,
	}
	t.TimeSigned = uint64(e.ServerTime.Unix())
	if e.Code == dns.RcodeBadTime {
		t.TimeSigned = req.TimeSigned
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(e.ServerTime.Unix()))
		t.OtherLen = 6
		t.OtherData = hex.EncodeToString(b[2:])
	}
	return t
}

// OtherTime decodes the server time of a BADTIME response's Other Data.
func OtherTime(t *dns.TSIG) (time.Time, bool) {
	b, err := hex.DecodeString(t.OtherData)
	if err != nil || len(b) != 6 {
		return time.Time{}, false
	}
	var full [8]byte
	copy(full[2:], b)
	return time.Unix(int64(binary.BigEndian.Uint64(full[:])), 0), true
}
