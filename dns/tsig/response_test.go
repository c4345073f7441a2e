package tsig

import (
	"errors"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// response signs an answer to a request whose MAC was reqMAC, as a server
// using miekg/dns would.
func response(t testing.TB, k Key, reqMAC string, rcode int, tsigErr uint16) []byte {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion("laptop.alice.btmm.example.", dns.TypeAAAA)
	m.Response, m.Rcode, m.Id = true, rcode, 4242
	aaaa, _ := dns.NewRR("laptop.alice.btmm.example. 60 IN AAAA fd00::1")
	m.Answer = []dns.RR{aaaa}
	m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
	m.IsTsig().Error = tsigErr
	b, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), reqMAC, false)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVerifyResponse(t *testing.T) {
	k, _ := NewKey("laptop.alice.btmm.example.", "hmac-sha256")
	md5k, _ := NewKey("laptop.alice.btmm.example.", "hmac-md5")
	other, _ := NewKey("laptop.alice.btmm.example.", "hmac-sha256")
	const reqMAC = "00112233445566778899aabbccddeeff"
	unsigned := func() []byte {
		m := new(dns.Msg)
		m.SetQuestion("x.", dns.TypeA)
		m.Response = true
		b, _ := m.Pack()
		return b
	}
	for _, tc := range []struct {
		name string
		key  Key
		raw  []byte
		mac  string
		want error
	}{
		{"answer", k, response(t, k, reqMAC, dns.RcodeSuccess, 0), reqMAC, nil},
		{"md5", md5k, response(t, md5k, reqMAC, dns.RcodeSuccess, 0), reqMAC, nil},
		{"event without request MAC", k, response(t, k, "", dns.RcodeSuccess, 0), "", nil},
		{"signed BADTIME", k, response(t, k, reqMAC, dns.RcodeNotAuth, dns.RcodeBadTime), reqMAC, nil},
		{"another request's MAC", k, response(t, k, reqMAC, dns.RcodeSuccess, 0), "ff" + reqMAC[2:], ErrResponseMAC},
		{"another key", k, response(t, other, reqMAC, dns.RcodeSuccess, 0), reqMAC, ErrResponseMAC},
		{"another algorithm", k, response(t, md5k, reqMAC, dns.RcodeSuccess, 0), reqMAC, ErrResponseMAC},
		{"unsigned", k, unsigned(), reqMAC, ErrUnsigned},
		{"BADKEY is unsigned", k, response(t, k, reqMAC, dns.RcodeNotAuth, dns.RcodeBadKey), reqMAC, ErrUnsigned},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.key.VerifyResponse(tc.raw, tc.mac)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			// miekg/dns agrees wherever it can judge (it cannot verify NOTAUTH answers).
			if tc.want == nil && tc.name != "signed BADTIME" {
				if err := dns.TsigVerifyWithProvider(append([]byte(nil), tc.raw...), tc.key.Provider(), tc.mac, false); err != nil {
					t.Fatalf("miekg/dns disagrees: %v", err)
				}
			}
		})
	}
}

// FuzzVerifyResponse: arbitrary bytes never panic, and an accepted
// response verifies with miekg/dns too.
func FuzzVerifyResponse(f *testing.F) {
	k, _ := NewKey("laptop.alice.btmm.example.", "hmac-sha256")
	f.Add(response(f, k, "", dns.RcodeSuccess, 0))
	f.Add(response(f, k, "", dns.RcodeNotAuth, dns.RcodeBadTime))
	f.Fuzz(func(t *testing.T, b []byte) {
		ts, err := k.VerifyResponse(append([]byte(nil), b...), "")
		if err != nil || ts.Error != 0 {
			return
		}
		m := new(dns.Msg)
		if m.Unpack(b) != nil || b[3]&0xf == dns.RcodeNotAuth {
			return
		}
		if err := dns.TsigVerifyWithProvider(append([]byte(nil), b...), k.Provider(), "", false); err != nil && err != dns.ErrTime {
			t.Fatalf("accepted, miekg/dns says %v", err)
		}
	})
}
