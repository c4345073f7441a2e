// Package registertest runs BIND's named (RFC 2136 + TSIG, an independent
// implementation) as a real peer for the tests of package register and of
// the DNS clients that sit beside it.
package registertest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// Key is what StartNamed needs of a TSIG key.
type Key interface {
	MarshalBIND() string // key "name" { algorithm ...; secret "..."; };
}

// StartNamed runs named on 127.0.0.1:<free port> as the primary for zone,
// granting keyName `zonesub ANY` updates, with SRV records
// _dns-update._udp and _dns-llq._udp pointing at itself, plus extra zone
// file lines. It is killed at cleanup (its log is printed if the test
// failed). Skips without root or named (fails under BTMM_REQUIRE_ALL=1).
func StartNamed(t testing.TB, zone string, key Key, keyName string, extra ...string) string {
	t.Helper()
	named := testenv.RequireBinary(t, "named", "bind9")
	testenv.RequireRoot(t)
	port := FreePort(t)
	dir := t.TempDir()
	zone = dns.Fqdn(zone)
	zoneFile := fmt.Sprintf(`$TTL 60
@ IN SOA ns.%[1]s hostmaster.%[1]s 1 3600 600 86400 60
@ IN NS ns.%[1]s
ns IN A 127.0.0.1
_dns-update._udp IN SRV 0 0 %[2]d ns.%[1]s
_dns-llq._udp IN SRV 0 0 %[2]d ns.%[1]s
%[3]s
`, zone, port, strings.Join(extra, "\n"))
	conf := fmt.Sprintf(`%s
options {
	directory "%[2]s";
	listen-on port %[3]d { 127.0.0.1; };
	listen-on-v6 { none; };
	pid-file none;
	recursion no;
	dnssec-validation no;
	notify no;
};
controls { };
zone "%[4]s" {
	type primary;
	file "%[2]s/zone.db";
	update-policy { grant %[5]s zonesub ANY; };
};
`, key.MarshalBIND(), dir, port, zone, strings.TrimSuffix(keyName, "."))
	if err := os.WriteFile(filepath.Join(dir, "zone.db"), []byte(zoneFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "named.conf"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, named, "-g", "-u", "root", "-c", filepath.Join(dir, "named.conf"))
	var log strings.Builder
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
		if t.Failed() {
			t.Logf("named log:\n%s", log.String())
		}
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(10 * time.Second)
	for {
		q := new(dns.Msg)
		q.SetQuestion(zone, dns.TypeSOA)
		c := &dns.Client{Timeout: 200 * time.Millisecond}
		if r, _, err := c.Exchange(q, addr); err == nil && r.Rcode == dns.RcodeSuccess {
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("named did not answer on %s", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// FreePort returns a port free for both UDP and TCP on 127.0.0.1.
func FreePort(t testing.TB) int {
	t.Helper()
	for range 20 {
		l, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.LocalAddr().(*net.UDPAddr).Port
		tl, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err == nil {
			tl.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}
