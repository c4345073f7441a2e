package tsig

import (
	"bytes"
	"encoding/hex"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// miekgSigned is the reference: miekg/dns signing the same message.
func miekgSigned(t testing.TB, k Key, m *dns.Msg, ts uint64, fudge uint16) []byte {
	t.Helper()
	m = m.Copy()
	m.SetTsig(k.Name, k.Algorithm, fudge, int64(ts))
	out, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), "", false)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func eventMsg(name string, id uint16) *dns.Msg {
	m := new(dns.Msg)
	m.Id = id
	m.Response, m.Authoritative = true, true
	m.Question = []dns.Question{{Name: name, Qtype: dns.TypeAAAA, Qclass: dns.ClassINET}}
	rr, _ := dns.NewRR(name + " 60 IN AAAA fd00::1")
	m.Answer = []dns.RR{rr}
	m.SetEdns0(4096, false)
	m.IsEdns0().Option = append(m.IsEdns0().Option, &dns.EDNS0_LLQ{Code: dns.EDNS0LLQ, Version: 1, Opcode: 3, Id: 0x1122334455667788})
	return m
}

// TestSignerMatchesMiekg: Sign's output is byte for byte miekg/dns's, for
// every algorithm, and verifies with miekg/dns and with VerifyResponse.
func TestSignerMatchesMiekg(t *testing.T) {
	for _, alg := range []string{HmacMD5, HmacSHA1, HmacSHA224, HmacSHA256, HmacSHA384, HmacSHA512} {
		k, err := NewKey("Host1.Alice.btmm.example.", alg)
		if err != nil {
			t.Fatal(err)
		}
		s, err := k.Signer()
		if err != nil {
			t.Fatal(err)
		}
		for i, m := range []*dns.Msg{eventMsg("peers.alice.btmm.example.", 0xbeef), eventMsg("x.", 1), new(dns.Msg)} {
			wire, err := m.Pack()
			if err != nil {
				t.Fatal(err)
			}
			ts := uint64(time.Now().Unix()) + uint64(i)
			got, err := s.Sign([]byte("prefix"), wire, ts, 300)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(got, []byte("prefix")) {
				t.Fatalf("%s: dst not appended to", alg)
			}
			got = got[len("prefix"):]
			want := miekgSigned(t, k, m, ts, 300)
			if !bytes.Equal(got, want) {
				t.Fatalf("%s msg %d: signed wire differs from miekg/dns:\n got %s\nwant %s", alg, i, hex.EncodeToString(got), hex.EncodeToString(want))
			}
			if _, err := k.VerifyResponse(append([]byte(nil), got...), ""); err != nil {
				t.Fatalf("%s msg %d: VerifyResponse: %v", alg, i, err)
			}
			if err := dns.TsigVerifyWithProvider(append([]byte(nil), got...), k.Provider(), "", false); err != nil {
				t.Fatalf("%s msg %d: miekg verify: %v", alg, i, err)
			}
			if !bytes.Equal(wire, mustPack(t, m)) {
				t.Fatal("Sign modified its input")
			}
		}
	}
}

func mustPack(t testing.TB, m *dns.Msg) []byte {
	w, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func TestSignerErrors(t *testing.T) {
	if _, err := (Key{Name: "k.", Algorithm: "hmac-nope."}).Signer(); err == nil {
		t.Error("unknown algorithm accepted")
	}
	k, _ := NewKey("k.", "")
	s, _ := k.Signer()
	if _, err := s.Sign(nil, make([]byte, 11), 1, 300); err == nil {
		t.Error("11-byte message signed")
	}
}

// FuzzSigner: for any message miekg/dns packs, Sign agrees with miekg/dns.
func FuzzSigner(f *testing.F) {
	f.Add("peers.alice.btmm.example.", uint16(0xbeef), []byte{0xfd, 0, 0, 1}, uint64(1764000000), uint16(300))
	f.Add("a.", uint16(0), []byte{}, uint64(0), uint16(0))
	k, _ := NewKey("host.alice.btmm.example.", HmacSHA256)
	s, _ := k.Signer()
	f.Fuzz(func(t *testing.T, name string, id uint16, rdata []byte, ts uint64, fudge uint16) {
		// miekg/dns replaces a zero time (now) and fudge (300): not comparable.
		ts &= 1<<48 - 1
		ts, fudge = max(ts, 1), max(fudge, 1)
		if _, ok := dns.IsDomainName(name); !ok {
			return
		}
		m := eventMsg(dns.Fqdn(name), id)
		m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: dns.Fqdn(name), Rrtype: dns.TypeTXT, Class: dns.ClassINET}, Txt: []string{string(rdata)}})
		wire, err := m.Pack()
		if err != nil || len(wire) > 60000 {
			return
		}
		got, err := s.Sign(nil, wire, ts, fudge)
		if err != nil {
			t.Fatal(err)
		}
		if want := miekgSigned(t, k, m, ts, fudge); !bytes.Equal(got, want) {
			t.Fatalf("differs from miekg/dns:\n got %x\nwant %x", got, want)
		}
	})
}
