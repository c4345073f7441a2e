package register_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/internal/dnsextdtest"
	"github.com/miekg/dns"
)

func answer(t *testing.T, k tsig.Key, reqMAC string, signedAt time.Time, tsigErr uint16) []byte {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion("laptop.alice.btmm.example.", dns.TypeAAAA)
	m.Response = true
	if k.Name == "" {
		b, _ := m.Pack()
		return b
	}
	m.SetTsig(k.Name, k.Algorithm, 300, signedAt.Unix())
	m.IsTsig().Error = tsigErr
	b, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), reqMAC, false)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestResponsePolicy(t *testing.T) {
	tk, _ := tsig.NewKey("laptop.alice.btmm.example.", "hmac-sha256")
	other, _ := tsig.NewKey("laptop.alice.btmm.example.", "hmac-sha256")
	k, _ := register.NewKey(tk.Name, tk.Algorithm, tk.Base64())
	const mac = "0011223344556677"
	now := time.Now()
	for _, tc := range []struct {
		name   string
		raw    []byte
		strict error // want, default policy
		lax    error // want, AcceptUnsigned
	}{
		{"signed", answer(t, tk, mac, now, 0), nil, nil},
		{"unsigned", answer(t, tsig.Key{}, mac, now, 0), register.ErrServerDoesNotSign, nil},
		{"another key", answer(t, other, mac, now, 0), register.ErrBadResponseSignature, register.ErrBadResponseSignature},
		{"another request", answer(t, tk, "ff"+mac[2:], now, 0), register.ErrBadResponseSignature, register.ErrBadResponseSignature},
		{"signed an hour ago", answer(t, tk, mac, now.Add(-time.Hour), 0), register.ErrBadResponseSignature, register.ErrBadResponseSignature},
		{"BADKEY (unsigned by design)", answer(t, tk, mac, now, dns.RcodeBadKey), register.ErrKeyRefused, register.ErrKeyRefused},
	} {
		for _, p := range []struct {
			policy register.ResponsePolicy
			want   error
		}{{register.ResponsePolicy{}, tc.strict}, {register.ResponsePolicy{AcceptUnsigned: true}, tc.lax}} {
			if err := p.policy.Check(k, tc.raw, mac); !errors.Is(err, p.want) || (p.want == nil) != (err == nil) {
				t.Errorf("%s, %+v: got %v, want %v", tc.name, p.policy, err, p.want)
			}
		}
	}
	if err := (register.ResponsePolicy{}).Check(nil, answer(t, tsig.Key{}, "", now, 0), ""); err != nil {
		t.Errorf("unsigned client: %v", err)
	}
}

// TestRegisterAgainstServerThatNeverSigns: dnsextdtest (a test double of
// Apple's dnsextd's signing behaviour, in front of a real btmm-dnsd) applies
// the update but answers unsigned: by default that is not success (the
// status says why); with AcceptUnsigned it is.
func TestRegisterAgainstServerThatNeverSigns(t *testing.T) {
	if testing.Short() {
		t.Skip("btmm-dnsd on 127.0.0.1; skipped under -short")
	}
	srv, err := server.New(server.Config{Zone: "btmm.example.", DataDir: t.TempDir(), Listen: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := srv.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	user, _ := srv.AddUser("alice", "")
	hk, _ := srv.AddHost("alice", "laptop", "")
	relay, err := dnsextdtest.Start(addrs.DNS, user)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	key, _ := register.NewKey(hk.Name, hk.Algorithm, hk.Base64())
	for _, accept := range []bool{false, true} {
		r, err := register.New(register.Config{Domain: "alice.btmm.example.", Zone: "btmm.example.", Host: "laptop",
			ULA: netip.MustParseAddr("fd00::1"), Label: "AutoTunnel-L", Key: key, Server: relay.Addr,
			AcceptUnsigned: accept, Timeout: time.Second, MaxBackoff: time.Second}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		deadline := time.Now().Add(15 * time.Second)
		for {
			st := r.Status()
			if !accept && st.Failures > 0 {
				if st.Published || !strings.Contains(st.LastError, "server does not sign") {
					t.Fatalf("strict: %+v", st)
				}
				break
			}
			if accept && st.Published {
				if !st.AcceptUnsigned {
					t.Fatalf("status does not say unsigned answers are accepted: %+v", st)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("accept=%v: %+v", accept, st)
			}
			time.Sleep(50 * time.Millisecond)
		}
		cancel()
		<-done
	}
	if relay.Stripped() == 0 {
		t.Fatal("the double stripped nothing")
	}
}
