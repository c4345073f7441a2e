package server_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// Conformance with independent clients (BIND's dig and nsupdate, Knot's
// kdig) for the zone-per-user layout of docs/dnsd.md: what Apple's client
// does — find the zone of a name by its SOA, then the discovery SRVs at that
// zone, then UPDATE naming that zone — done with stock tools.

func digOut(t *testing.T, bin, addr string, args ...string) string {
	t.Helper()
	host, port, _ := strings.Cut(addr, ":")
	opts := []string{"@" + host, "-p", port, "+norec", "+time=10", "+tries=1"}
	if strings.HasSuffix(bin, "kdig") {
		opts = []string{"@" + host, "-p", port, "+norec", "+timeout=10", "+retry=0"}
	}
	out, err := exec.Command(bin, append(opts, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", bin, args, err, out)
	}
	return string(out)
}

// section returns the lines of a dig/kdig output section ("ANSWER", "AUTHORITY", "ADDITIONAL").
func section(out, name string) string {
	var b strings.Builder
	in := false
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, ";; "+name) || strings.HasPrefix(l, ";; "+strings.ToUpper(name[:1])+strings.ToLower(name[1:])):
			in = true
		case strings.HasPrefix(l, ";;"):
			in = false
		case in && strings.TrimSpace(l) != "":
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func TestDigKdigZonePerUser(t *testing.T) {
	dig := testenv.RequireBinary(t, "dig", "bind9-dnsutils")
	kdig := testenv.RequireBinary(t, "kdig", "knot-dnsutils")
	srv, addrs := startServer(t, t.TempDir(), nil)
	addUser(t, srv, "alice", "")
	soa := regexp.MustCompile(`(?m)^alice\.btmm\.example\.\s+\d+\s+IN\s+SOA\s+ns\.btmm\.example\. hostmaster\.btmm\.example\.`)
	for _, bin := range []string{dig, kdig} {
		t.Run(bin[strings.LastIndex(bin, "/")+1:], func(t *testing.T) {
			// 1. The SOA of the user's domain: a zone of its own, authoritative.
			out := digOut(t, bin, addrs.DNS, "alice.btmm.example.", "SOA")
			if !soa.MatchString(section(out, "ANSWER")) || !strings.Contains(out, " aa") {
				t.Fatalf("SOA at the user's apex:\n%s", out)
			}
			// 2. A name below it: the negative answer names the user's zone.
			out = digOut(t, bin, addrs.DNS, "nothing.alice.btmm.example.", "SOA")
			if !soa.MatchString(section(out, "AUTHORITY")) {
				t.Fatalf("negative answer below the user lacks the user's SOA:\n%s", out)
			}
			// 3. NS at the apex (the parent's delegation too), with glue.
			out = digOut(t, bin, addrs.DNS, "alice.btmm.example.", "NS")
			if !strings.Contains(section(out, "ANSWER"), "NS\tns.btmm.example.") && !strings.Contains(section(out, "ANSWER"), "NS ns.btmm.example.") {
				t.Fatalf("NS:\n%s", out)
			}
			if !strings.Contains(section(out, "ADDITIONAL"), "127.0.0.1") {
				t.Fatalf("NS without glue:\n%s", out)
			}
			// 4. The discovery SRVs at the zone found.
			for _, svc := range []string{"_dns-update._udp", "_dns-llq._udp", "_dns-update-tls._tcp", "_dns-llq-tls._tcp"} {
				out = digOut(t, bin, addrs.DNS, svc+".alice.btmm.example.", "SRV")
				if !strings.Contains(section(out, "ANSWER"), "ns.btmm.example.") {
					t.Fatalf("%s SRV:\n%s", svc, out)
				}
			}
		})
	}
}

// TestNsupdateUserZone: nsupdate naming the user's zone, and nsupdate
// finding the zone itself (no "zone" line: it asks for the SOA, as Apple's
// client does).
func TestNsupdateUserZone(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	alice := addUser(t, srv, "alice", "")
	bob := addUser(t, srv, "bob", "")
	host, port, _ := strings.Cut(addrs.DNS, ":")
	auth := func(k interface{ Base64() string }, name string) []string {
		return []string{"-y", "hmac-sha256:" + name + ":" + k.Base64()}
	}
	for _, tc := range []struct {
		name, script string
		ok           bool
	}{
		{"zone named", fmt.Sprintf("server %s %s\nzone alice.btmm.example.\nupdate add a.alice.btmm.example. 60 A 192.0.2.1\nsend\n", host, port), true},
		{"zone found by SOA", fmt.Sprintf("server %s %s\nupdate add b.alice.btmm.example. 60 A 192.0.2.2\nsend\n", host, port), true},
		{"parent zone", fmt.Sprintf("server %s %s\nzone btmm.example.\nupdate add c.alice.btmm.example. 60 A 192.0.2.3\nsend\n", host, port), true},
		{"name outside the zone", fmt.Sprintf("server %s %s\nzone alice.btmm.example.\nupdate add d.bob.btmm.example. 60 A 192.0.2.4\nsend\n", host, port), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := nsupdate(t, auth(alice, alice.Name), tc.script)
			if (err == nil) != tc.ok {
				t.Fatalf("nsupdate: %v\n%s", err, out)
			}
		})
	}
	for _, n := range []string{"a", "b", "c"} {
		if q := signedQuery(t, addrs.DNS, alice, n+".alice.btmm.example.", dns.TypeA); len(q.Answer) != 1 {
			t.Fatalf("%s: %v", n, q)
		}
	}
	// Bob's key, naming alice's zone: REFUSED.
	out, err := nsupdate(t, auth(bob, bob.Name), fmt.Sprintf("server %s %s\nzone alice.btmm.example.\nupdate add e.alice.btmm.example. 60 A 192.0.2.5\nsend\n", host, port))
	if err == nil || !strings.Contains(out, "REFUSED") {
		t.Fatalf("bob in alice's zone: %v\n%s", err, out)
	}
}

// TestNsupdateMaliciousHost: issue 13's malicious host, with nsupdate as the
// client: a third host of alice with its own valid key publishes (a) the
// desktop's ULA under its own name, (b) its own ULA under the desktop's
// name; both are REFUSED and change nothing, while its own registration
// works.
func TestNsupdateMaliciousHost(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	addUser(t, srv, "alice", "")
	desktop := addHost(t, srv, "alice", "desktop", "")
	mallory := addHost(t, srv, "alice", "mallory", "hmac-md5")
	keyFile := func(k tsig.Key) []string {
		f := filepath.Join(t.TempDir(), "k.conf")
		os.WriteFile(f, []byte(k.BINDClause()), 0o600)
		return []string{"-k", f}
	}
	host, port, _ := strings.Cut(addrs.DNS, ":")
	head := fmt.Sprintf("server %s %s\nzone alice.btmm.example.\n", host, port)
	d := ".alice.btmm.example."
	out, err := nsupdate(t, keyFile(desktop), head+
		"update add desktop"+d+" 60 AAAA fd00::b\n"+
		"update add _autotunnel._udp.desktop"+d+" 60 SRV 0 0 4500 AutoTunnel-B"+d+"\n"+
		"update add AutoTunnel-B"+d+" 60 A 198.51.100.2\n"+
		"update add _autotunnel._udp"+d+" 60 PTR _autotunnel._udp.desktop"+d+"\nsend\n")
	if err != nil {
		t.Fatalf("desktop registers: %v\n%s", err, out)
	}
	snapshot := func() string {
		recs, _ := srv.Store().All()
		var b strings.Builder
		for _, r := range recs {
			b.WriteString(r.RR.String() + "\n")
		}
		return b.String()
	}
	before := snapshot()
	for _, tc := range []struct{ name, script string }{
		{"(a) the desktop's ULA under its own name", "update add mallory" + d + " 60 AAAA fd00::b\n"},
		{"(b) its own ULA under the desktop's name", "update add desktop" + d + " 60 AAAA fd00::66\n"},
		{"(b) the desktop's ULA deleted", "update delete desktop" + d + " AAAA\n"},
		{"the desktop's SRV target taken over", "update add AutoTunnel-B" + d + " 60 A 203.0.113.66\n"},
		{"the desktop's PTR deleted", "update delete _autotunnel._udp" + d + " PTR _autotunnel._udp.desktop" + d + "\n"},
		{"a prerequisite on the desktop's name", "prereq yxdomain desktop" + d + "\nupdate add mallory" + d + " 60 TXT probe\n"},
		{"a CNAME", "update add mallory" + d + " 60 CNAME desktop" + d + "\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := nsupdate(t, keyFile(mallory), head+tc.script+"send\n")
			if err == nil || !strings.Contains(out, "REFUSED") {
				t.Fatalf("want REFUSED: %v\n%s", err, out)
			}
			if after := snapshot(); after != before {
				t.Fatalf("the zone changed:\n%s", after)
			}
		})
	}
	out, err = nsupdate(t, keyFile(mallory), head+
		"update add mallory"+d+" 60 AAAA fd00::66\n"+
		"update add _autotunnel._udp.mallory"+d+" 60 SRV 0 0 4500 AutoTunnel-M"+d+"\n"+
		"update add AutoTunnel-M"+d+" 60 A 198.51.100.3\n"+
		"update add _autotunnel._udp"+d+" 60 PTR _autotunnel._udp.mallory"+d+"\nsend\n")
	if err != nil {
		t.Fatalf("mallory's own registration: %v\n%s", err, out)
	}
	if q := signedQuery(t, addrs.DNS, desktop, "desktop"+d, dns.TypeAAAA); len(q.Answer) != 1 || q.Answer[0].(*dns.AAAA).AAAA.String() != "fd00::b" {
		t.Fatalf("desktop's AAAA: %v", q.Answer)
	}
}
