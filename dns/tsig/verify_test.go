package tsig

import (
	"errors"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// signed returns a query for name signed with k at time ts with fudge.
func signed(t testing.TB, k Key, name string, ts time.Time, fudge uint16) []byte {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	m.SetTsig(k.Name, k.Algorithm, fudge, ts.Unix())
	b, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), "", false)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rewriteMAC re-packs a signed message with its MAC cut to n octets (or
// extended with zeros).
func rewriteMAC(t testing.TB, b []byte, n int) []byte {
	t.Helper()
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		t.Fatal(err)
	}
	ts := m.IsTsig()
	mac := ts.MAC
	for len(mac) < 2*n {
		mac += "00"
	}
	ts.MAC, ts.MACSize = mac[:2*n], uint16(n)
	out, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func verify(v *Verifier, b []byte) (string, error) {
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		return "", err
	}
	return v.Verify(append([]byte(nil), b...), m.IsTsig())
}

func code(err error) (uint16, int) {
	var ve *VerifyError
	if !errors.As(err, &ve) {
		return 0xffff, -1
	}
	return ve.Code, ve.Rcode
}

func TestVerifier(t *testing.T) {
	k, _ := NewKey("laptop.alice.btmm.example.", "hmac-sha256")
	md5k, _ := NewKey("alice.btmm.example.", "hmac-md5")
	ring := NewKeyring()
	ring.Add(k)
	ring.Add(md5k)
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	newV := func() *Verifier { return &Verifier{Keys: ring, Now: clock} }
	other, _ := NewKey(k.Name, "hmac-sha256")
	unknown, _ := NewKey("bob.btmm.example.", "hmac-sha256")

	for _, tc := range []struct {
		name  string
		msg   func() []byte
		code  uint16
		rcode int
	}{
		{"good", func() []byte { return signed(t, k, "a.", now, 300) }, 0, 0},
		{"good md5", func() []byte { return signed(t, md5k, "a.", now, 300) }, 0, 0},
		{"skew inside fudge", func() []byte { return signed(t, k, "a.", now.Add(-299*time.Second), 300) }, 0, 0},
		{"future inside fudge", func() []byte { return signed(t, k, "a.", now.Add(299*time.Second), 300) }, 0, 0},
		{"outside fudge", func() []byte { return signed(t, k, "a.", now.Add(-301*time.Second), 300) }, dns.RcodeBadTime, dns.RcodeNotAuth},
		{"signer's fudge is capped", func() []byte { return signed(t, k, "a.", now.Add(-time.Hour), 65535) }, dns.RcodeBadTime, dns.RcodeNotAuth},
		{"signer's smaller fudge counts", func() []byte { return signed(t, k, "a.", now.Add(-20*time.Second), 10) }, dns.RcodeBadTime, dns.RcodeNotAuth},
		{"wrong secret", func() []byte { return signed(t, other, "a.", now, 300) }, dns.RcodeBadSig, dns.RcodeNotAuth},
		{"unknown key", func() []byte { return signed(t, unknown, "a.", now, 300) }, dns.RcodeBadKey, dns.RcodeNotAuth},
		{"truncated to half", func() []byte { return rewriteMAC(t, signed(t, k, "a.", now, 300), 16) }, dns.RcodeBadTrunc, dns.RcodeNotAuth},
		{"md5 truncated to 10", func() []byte { return rewriteMAC(t, signed(t, md5k, "a.", now, 300), 10) }, dns.RcodeBadTrunc, dns.RcodeNotAuth},
		{"truncated below half", func() []byte { return rewriteMAC(t, signed(t, k, "a.", now, 300), 15) }, 0, dns.RcodeFormatError},
		{"md5 below 10", func() []byte { return rewriteMAC(t, signed(t, md5k, "a.", now, 300), 9) }, 0, dns.RcodeFormatError},
		{"longer than the hash", func() []byte { return rewriteMAC(t, signed(t, k, "a.", now, 300), 33) }, 0, dns.RcodeFormatError},
		{"truncated and wrong", func() []byte {
			b := rewriteMAC(t, signed(t, k, "a.", now, 300), 16)
			b[len(b)-9] ^= 1 // inside the MAC (followed by orig id, error, other len)
			return b
		}, dns.RcodeBadSig, dns.RcodeNotAuth},
		{"signed before the server started", func() []byte { return signed(t, k, "a.", now.Add(-time.Second), 300) }, dns.RcodeBadTime, dns.RcodeNotAuth},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newV()
			if tc.name == "signed before the server started" {
				v.init()
			} else {
				v.Now = func() time.Time { return now.Add(-time.Hour) }
				v.init() // started an hour ago
				v.Now = clock
			}
			key, err := verify(v, tc.msg())
			if tc.code == 0 && tc.rcode == 0 {
				if err != nil || key == "" {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			c, rc := code(err)
			if c != tc.code || rc != tc.rcode {
				t.Fatalf("got %v (code %d rcode %d), want code %d rcode %d", err, c, rc, tc.code, tc.rcode)
			}
		})
	}
}

func TestVerifierReplay(t *testing.T) {
	k, _ := NewKey("alice.btmm.example.", "hmac-sha256")
	ring := NewKeyring()
	ring.Add(k)
	now := time.Unix(1_700_000_000, 0)
	v := &Verifier{Keys: ring, Now: func() time.Time { return now }, MaxSeen: 3}
	v.init()
	a := signed(t, k, "a.", now, 300)
	if _, err := verify(v, a); err != nil {
		t.Fatal(err)
	}
	// A copy while the first is being handled is a retransmission; once
	// answered, a copy is a replay.
	if err := mustFail(t, v, a); err != ErrRetransmission {
		t.Fatalf("copy in flight: %v", err)
	}
	am := new(dns.Msg)
	am.Unpack(a)
	v.Done(k.Name, am.IsTsig())
	if c, _ := code(mustFail(t, v, a)); c != dns.RcodeBadTime {
		t.Fatalf("replay: code %d", c)
	}
	// A different message of the same second, and an older one arriving
	// later (another host sharing the key), are not replays.
	if _, err := verify(v, signed(t, k, "b.", now, 300)); err != nil {
		t.Fatal(err)
	}
	now = now.Add(5 * time.Second)
	if _, err := verify(v, signed(t, k, "c.", now, 300)); err != nil {
		t.Fatal(err)
	}
	if _, err := verify(v, signed(t, k, "d.", now.Add(-3*time.Second), 300)); err != nil {
		t.Fatalf("out-of-order message of another signer refused: %v", err)
	}
	// The memory is full (3): the oldest are forgotten, and anything
	// signed at or before them is refused from now on.
	if _, err := verify(v, signed(t, k, "e.", now, 300)); err != nil {
		t.Fatal(err)
	}
	if c, _ := code(mustFail(t, v, signed(t, k, "f.", now.Add(-5*time.Second), 300))); c != dns.RcodeBadTime {
		t.Fatalf("message at the forgotten time: code %d", c)
	}
	// After the window the replay is refused by the time check anyway.
	now = now.Add(10 * time.Minute)
	if c, _ := code(mustFail(t, v, a)); c != dns.RcodeBadTime {
		t.Fatalf("old replay: code %d", c)
	}
	// Another key has its own memory.
	k2, _ := NewKey("bob.btmm.example.", "hmac-sha256")
	ring.Add(k2)
	if _, err := verify(v, signed(t, k2, "a.", now, 300)); err != nil {
		t.Fatal(err)
	}
}

func mustFail(t *testing.T, v *Verifier, b []byte) error {
	t.Helper()
	_, err := verify(v, b)
	if err == nil {
		t.Fatal("accepted")
	}
	return err
}

func TestErrorTSIGBadTime(t *testing.T) {
	k, _ := NewKey("alice.btmm.example.", "hmac-sha256")
	now := time.Unix(1_700_000_000, 0)
	req := &dns.TSIG{Hdr: dns.RR_Header{Name: k.Name}, Algorithm: k.Algorithm, TimeSigned: uint64(now.Add(-time.Hour).Unix()), Fudge: 300}
	et := ErrorTSIG(req, 7, &VerifyError{Code: dns.RcodeBadTime, Rcode: dns.RcodeNotAuth, ServerTime: now}, 0)
	if et.TimeSigned != req.TimeSigned || et.Error != dns.RcodeBadTime || et.OtherLen != 6 {
		t.Fatalf("%v", et)
	}
	if got, ok := OtherTime(et); !ok || !got.Equal(now) {
		t.Fatalf("other time %v %v", got, ok)
	}
	// It is signed with the request's MAC and verifies as the client would.
	resp := new(dns.Msg)
	resp.SetQuestion("a.", dns.TypeA)
	resp.Response, resp.Rcode = true, dns.RcodeNotAuth
	resp.Extra = append(resp.Extra, et)
	if _, _, err := dns.TsigGenerateWithProvider(resp, k.Provider(), "0011", false); err != nil {
		t.Fatal(err)
	}
}

// FuzzVerify: any message carrying a TSIG is verified without panicking,
// and only a message signed with the key is accepted.
func FuzzVerify(f *testing.F) {
	k, _ := NewKey("alice.btmm.example.", "hmac-sha256")
	now := time.Unix(1_700_000_000, 0)
	f.Add(signed(f, k, "a.", now, 300))
	f.Add(rewriteMAC(f, signed(f, k, "a.", now, 300), 16))
	f.Add(signed(f, k, "a.", now.Add(time.Hour), 65535))
	f.Fuzz(func(t *testing.T, b []byte) {
		m := new(dns.Msg)
		if m.Unpack(b) != nil || m.IsTsig() == nil {
			return
		}
		ring := NewKeyring()
		ring.Add(k)
		v := &Verifier{Keys: ring, Now: func() time.Time { return now }}
		v.init()
		v.start = 0
		key, err := v.Verify(append([]byte(nil), b...), m.IsTsig())
		if err == nil {
			// Accepted: the full MAC must verify with the library too
			// (which checks the time against the real clock: ErrTime).
			lib := dns.TsigVerifyWithProvider(append([]byte(nil), b...), k.Provider(), "", false)
			if key != k.Name || lib != nil && lib != dns.ErrTime {
				t.Fatalf("accepted %q (library: %v): %v", key, lib, m)
			}
		}
	})
}

// A key signing many messages in one window (one host's key holding
// thousands of LLQs): all accepted, and each still refused when replayed.
func TestVerifierManyMessages(t *testing.T) {
	k, _ := NewKey("alice.btmm.example.", "hmac-md5")
	ring := NewKeyring()
	ring.Add(k)
	now := time.Unix(1_700_000_000, 0)
	v := NewVerifier(ring, 0, func() time.Time { return now })
	var first []byte
	for i := range 20000 {
		m := new(dns.Msg)
		m.SetQuestion("a.", dns.TypeA)
		m.Id = uint16(i)
		m.Extra = nil
		m.SetTsig(k.Name, k.Algorithm, 300, now.Unix())
		b, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), "", false)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = b
		}
		if _, err := verify(v, b); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		sent := new(dns.Msg)
		sent.Unpack(b)
		v.Done(k.Name, sent.IsTsig()) // answered, as the server does
		if i%1000 == 0 {
			now = now.Add(time.Second)
		}
	}
	if c, _ := code(mustFail(t, v, first)); c != dns.RcodeBadTime {
		t.Fatalf("replay of the first: code %d", c)
	}
}
