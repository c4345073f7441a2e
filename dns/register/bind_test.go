package register

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/register/registertest"
	"github.com/miekg/dns"
)

func startNamed(t *testing.T, zone string, key *Key) string {
	return registertest.StartNamed(t, zone, key, key.Name)
}

func query(t *testing.T, server, name string, qtype uint16) []dns.RR {
	t.Helper()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	r, _, err := new(dns.Client).Exchange(q, server)
	if err != nil {
		t.Fatalf("query %s: %v", name, err)
	}
	return r.Answer
}

func TestRegisterAgainstBIND(t *testing.T) {
	key, err := NewKey("alice.btmm.example", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==")
	if err != nil {
		t.Fatal(err)
	}
	server := startNamed(t, "alice.btmm.example.", key)

	// The key comes from a 0600 file in BIND's syntax, as in production.
	kf := filepath.Join(t.TempDir(), "tsig.key")
	if err := os.WriteFile(kf, []byte(key.MarshalBIND()), 0o600); err != nil {
		t.Fatal(err)
	}
	if key, err = LoadKeyFile(kf, ""); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	cfg.Key = key
	cfg.Server = "" // discovered: _dns-update._udp.alice.btmm.example. SRV
	cfg.Resolver = server
	r, err := New(cfg, slog.New(slog.NewTextHandler(testWriter{t}, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()

	waitFor(t, "records published", func() bool { return r.Status().Published })
	st := r.Status()
	if st.Server != server || st.LeaseEchoed || st.Lease != DefaultLease {
		t.Errorf("status = %+v; want discovered %s, lease assumed (BIND echoes none)", st, server)
	}
	names := r.Names()
	check := func(name string, qtype uint16, want string) {
		t.Helper()
		waitFor(t, fmt.Sprintf("%s %s = %q", name, dns.TypeToString[qtype], want), func() bool {
			var got []string
			for _, rr := range query(t, server, name, qtype) {
				got = append(got, strings.TrimPrefix(rr.String(), rr.Header().String()))
			}
			return strings.Join(got, "|") == want
		})
	}
	check(names.Host, dns.TypeAAAA, "fd01:203:405:607:22:69ff:fe8e:345c")
	check(names.Instance, dns.TypeSRV, "0 0 4500 AutoTunnel-00-22-69-FF-FE-8E-34-5C.alice.btmm.example.")
	check(names.Target, dns.TypeA, "11.0.0.2")
	check(names.Instance, dns.TypeTXT, `"txtvers=1" "proto=1" "dp=xfrm" "kport=4500"`)
	check(names.Browse, dns.TypePTR, "_autotunnel._udp.laptop.alice.btmm.example.")

	// Another host's PTR in the shared browse set must survive our updates.
	other := new(dns.Msg)
	other.SetUpdate("alice.btmm.example.")
	ptr, _ := dns.NewRR("_autotunnel._udp.alice.btmm.example. 60 IN PTR _autotunnel._udp.desktop.alice.btmm.example.")
	other.Insert([]dns.RR{ptr})
	other.SetTsig(key.Name, key.Algorithm, 300, time.Now().Unix())
	if rep, _, err := (&dns.Client{TsigSecret: key.Secrets()}).Exchange(other, server); err != nil || rep.Rcode != dns.RcodeSuccess {
		t.Fatalf("add other PTR: %v %v", rep, err)
	}

	// A NAT change is published at once.
	if err := r.SetOuter(netip.MustParseAddrPort("11.0.0.77:61001")); err != nil {
		t.Fatal(err)
	}
	check(names.Target, dns.TypeA, "11.0.0.77")
	check(names.Instance, dns.TypeSRV, "0 0 61001 AutoTunnel-00-22-69-FF-FE-8E-34-5C.alice.btmm.example.")

	// Clean shutdown deletes our records, and only ours.
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, n := range []struct {
		name  string
		qtype uint16
	}{{names.Host, dns.TypeAAAA}, {names.Instance, dns.TypeSRV}, {names.Instance, dns.TypeTXT}, {names.Target, dns.TypeA}} {
		if rrs := query(t, server, n.name, n.qtype); len(rrs) != 0 {
			t.Errorf("after shutdown %s still has %v", n.name, rrs)
		}
	}
	check(names.Browse, dns.TypePTR, "_autotunnel._udp.desktop.alice.btmm.example.")
}

func TestRegisterWrongKeyAgainstBIND(t *testing.T) {
	key, _ := NewKey("alice.btmm.example", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==")
	server := startNamed(t, "alice.btmm.example.", key)
	bad, _ := NewKey("alice.btmm.example", "hmac-sha256", "d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmc=")
	cfg := testConfig(t)
	cfg.Key = bad
	cfg.Server = server
	r, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.publishOnce(t.Context())
	if err == nil {
		t.Fatal("update with a wrong key succeeded")
	}
	if strings.Contains(err.Error(), bad.Secret()) {
		t.Errorf("error leaks the secret: %v", err)
	}
	if rrs := query(t, server, r.Names().Host, dns.TypeAAAA); len(rrs) != 0 {
		t.Errorf("refused update changed the zone: %v", rrs)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
