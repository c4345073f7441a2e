package llqclient_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/dns/server"
	"github.com/miekg/dns"
)

// TestDoTDiscoveredVerifiesSRVTarget: with DNS over TLS and the server
// found by SRV (no server configured), the registrar and the LLQ client
// verify btmm-dnsd's certificate against the SRV target's name
// (ns.btmm.example), not the address it resolved to: the generated
// certificate has no IP SAN, and a tls.Config naming no server (btmmd's,
// which only loads the CA) works (issue 17 rough edge).
func TestDoTDiscoveredVerifiesSRVTarget(t *testing.T) {
	if testing.Short() {
		t.Skip("btmm-dnsd on 127.0.0.1; skipped under -short")
	}
	dir := t.TempDir()
	srv, err := server.New(server.Config{Zone: "btmm.example.", DataDir: dir, Listen: "127.0.0.1:0", ListenTLS: "127.0.0.1:0",
		ServerAddrs: []string{"127.0.0.1"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := srv.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if _, err := srv.AddUser("alice", ""); err != nil {
		t.Fatal(err)
	}
	hk, err := srv.AddHost("alice", "laptop", "")
	if err != nil {
		t.Fatal(err)
	}
	key, _ := register.NewKey(hk.Name, hk.Algorithm, hk.Base64())
	pem, err := os.ReadFile(filepath.Join(dir, "tls", "cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12} // as btmmd's dns.ca_file: no ServerName

	r, err := register.New(register.Config{Domain: "alice.btmm.example.", Zone: "btmm.example.", Host: "laptop",
		ULA: netip.MustParseAddr("fd00::1"), Label: "AutoTunnel-L", Key: key, Resolver: addrs.DNS, TLS: tc,
		Timeout: 2 * time.Second, MaxBackoff: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := llqclient.New(llqclient.Config{Domain: "alice.btmm.example.", Resolver: addrs.DNS, TLS: tc, Key: key,
		Lease: time.Hour, Timeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	go c.Run(ctx)
	c.Watch("laptop.alice.btmm.example.", dns.TypeAAAA, func([]dns.RR) {})
	deadline := time.Now().Add(20 * time.Second)
	for {
		rs, ls := r.Status(), c.Status()
		if rs.Published && len(ls.Queries) == 1 && ls.Queries[0].Mode == llqclient.ModeLLQ {
			if rs.Server != addrs.TLS || ls.Server != addrs.TLS {
				t.Fatalf("not over TLS: registrar on %s, llq on %s, TLS is %s", rs.Server, ls.Server, addrs.TLS)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("registrar %+v\nllq %+v", rs, ls)
		}
		if strings.Contains(rs.LastError, "IP SAN") || strings.Contains(ls.LastError, "IP SAN") {
			t.Fatalf("certificate checked against the address: %q / %q", rs.LastError, ls.LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
