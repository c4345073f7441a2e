package server_test

import (
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// Tests with BIND's own clients as independent peers.

func nsupdate(t *testing.T, auth []string, script string) (string, error) {
	t.Helper()
	bin := testenv.RequireBinary(t, "nsupdate", "bind9-dnsutils")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append(auth, "-t", "5")...)
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func serverLine(addr string) string {
	h, p, _ := strings.Cut(addr, ":")
	return fmt.Sprintf("server %s %s\nzone btmm.example.\n", h, p)
}

func TestNsupdate(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	for _, tc := range []struct {
		user, alg string
		keyFile   bool
		tcp       bool
	}{
		{"alice", "hmac-sha256", false, false},
		{"bob", "hmac-md5", false, false},
		{"carol", "hmac-sha512", true, false},
		{"dave", "hmac-md5", true, true},
	} {
		t.Run(tc.user+"-"+tc.alg, func(t *testing.T) {
			k := addUser(t, srv, tc.user, tc.alg)
			var auth []string
			if tc.keyFile {
				// The admin command's output format, as nsupdate -k reads it.
				f := filepath.Join(t.TempDir(), "k.conf")
				os.WriteFile(f, []byte(k.BINDClause()), 0o600)
				auth = []string{"-k", f}
			} else {
				auth = []string{"-y", fmt.Sprintf("%s:%s:%s", strings.TrimSuffix(tc.alg, "."), k.Name, k.Base64())}
			}
			if tc.tcp {
				auth = append(auth, "-v")
			}
			name := "host." + tc.user + ".btmm.example."
			out, err := nsupdate(t, auth, serverLine(addrs.DNS)+
				"prereq nxdomain "+name+"\nupdate add "+name+" 120 IN AAAA fd00::7\nupdate add "+name+" 120 IN TXT \"hello world\"\nsend\n")
			if err != nil {
				t.Fatalf("nsupdate: %v\n%s", err, out)
			}
			if q := signedQuery(t, addrs.DNS, k, name, dns.TypeANY); len(q.Answer) != 2 {
				t.Fatalf("answers %v", q.Answer)
			}
			// The prerequisite now fails: YXDOMAIN, nothing changes.
			out, err = nsupdate(t, auth, serverLine(addrs.DNS)+
				"prereq nxdomain "+name+"\nupdate delete "+name+" AAAA\nsend\n")
			if err == nil || !strings.Contains(out, "YXDOMAIN") {
				t.Fatalf("want YXDOMAIN, got %v\n%s", err, out)
			}
			// Delete the RRset, then the name.
			out, err = nsupdate(t, auth, serverLine(addrs.DNS)+"update delete "+name+" AAAA\nsend\nupdate delete "+name+"\nsend\n")
			if err != nil {
				t.Fatalf("nsupdate delete: %v\n%s", err, out)
			}
			if q := signedQuery(t, addrs.DNS, k, name, dns.TypeANY); q.Rcode != dns.RcodeNameError {
				t.Fatalf("after delete: %v", q)
			}
			// Another user's subdomain is refused.
			out, err = nsupdate(t, auth, serverLine(addrs.DNS)+"update add x.zed.btmm.example. 60 A 192.0.2.9\nsend\n")
			if err == nil || !strings.Contains(out, "REFUSED") {
				t.Fatalf("cross-user: want REFUSED, got %v\n%s", err, out)
			}
		})
	}
	t.Run("wrong-secret", func(t *testing.T) {
		out, err := nsupdate(t, []string{"-y", "hmac-sha256:alice.btmm.example.:" + "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
			serverLine(addrs.DNS)+"update add y.alice.btmm.example. 60 A 192.0.2.1\nsend\n")
		if err == nil {
			t.Fatalf("wrong secret accepted:\n%s", out)
		}
	})
}

func TestDigUpdateLease(t *testing.T) {
	bin := testenv.RequireBinary(t, "dig", "bind9-dnsutils")
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	update(t, addrs.DNS, k, 3600, func(m *dns.Msg) {
		m.Insert([]dns.RR{rr(t, "mac.alice.btmm.example. 60 IN AAAA fd00::1")})
	})
	host, port, _ := strings.Cut(addrs.DNS, ":")
	// A signed UPDATE carrying only the Update-Lease option: 100 s requested,
	// clamped to 1800 (0x708) and echoed.
	out, err := exec.Command(bin, "@"+host, "-p", port, "-y", "hmac-sha256:"+k.Name+":"+k.Base64(),
		"+opcode=update", "+ednsopt=2:00000064", "btmm.example.", "SOA").CombinedOutput()
	if err != nil {
		t.Fatalf("dig: %v\n%s", err, out)
	}
	s := string(out)
	if !strings.Contains(s, "status: NOERROR") || !strings.Contains(s, "OPT=2: 00 00 07 08") {
		t.Fatalf("dig output lacks NOERROR / lease echo:\n%s", s)
	}
	if !strings.Contains(s, "tsig") && !strings.Contains(s, "TSIG") {
		t.Fatalf("response not signed:\n%s", s)
	}
}

func TestDigKdigLLQ(t *testing.T) {
	dig := testenv.RequireBinary(t, "dig", "bind9-dnsutils")
	kdig := testenv.RequireBinary(t, "kdig", "knot-dnsutils")
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	host, port, _ := strings.Cut(addrs.DNS, ":")
	// LLQ setup request: version 1, opcode SETUP, no error, id 0, lease 3600.
	opt := hex.EncodeToString([]byte{0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0e, 0x10})
	out, err := exec.Command(dig, "@"+host, "-p", port, "-y", "hmac-sha256:"+k.Name+":"+k.Base64(),
		"+ednsopt=LLQ:"+opt, "mac.alice.btmm.example.", "AAAA").CombinedOutput()
	if err != nil {
		t.Fatalf("dig: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "LLQ") || !strings.Contains(string(out), "status: NOERROR") {
		t.Fatalf("dig LLQ challenge:\n%s", out)
	}
	// kdig with the raw option code 1; unsigned LLQs are refused.
	out, err = exec.Command(kdig, "@"+host, "-p", port, "+ednsopt=1:"+opt, "mac.alice.btmm.example.", "AAAA").CombinedOutput()
	if err != nil {
		t.Fatalf("kdig: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "REFUSED") {
		t.Fatalf("kdig unsigned LLQ not refused:\n%s", out)
	}
	// kdig signed, from a fixed source port (the challenge is bound to the
	// client's address): a challenge comes back carrying option 1 with a
	// fresh id.
	src := freeUDPPort(t)
	out, err = exec.Command(kdig, "@"+host, "-p", port, "-b", src, "-y", "hmac-sha256:"+k.Name+":"+k.Base64(),
		"+ednsopt=1:"+opt, "mac.alice.btmm.example.", "AAAA").CombinedOutput()
	if err != nil {
		t.Fatalf("kdig: %v\n%s", err, out)
	}
	re := regexp.MustCompile(`Option \(1\): 00010001 ?0000([0-9A-F]{16})00000E10`)
	mm := re.FindStringSubmatch(strings.ReplaceAll(string(out), " ", ""))
	if mm == nil {
		// kdig prints the option without spaces; tolerate both.
		mm = regexp.MustCompile(`Option\(1\):000100010000([0-9A-F]{16})00000E10`).FindStringSubmatch(strings.ReplaceAll(string(out), " ", ""))
	}
	if mm == nil || !strings.Contains(string(out), "NOERROR") || srv.LLQs() != 0 {
		t.Fatalf("kdig LLQ challenge: llqs=%d\n%s", srv.LLQs(), out)
	}
	// The challenge response with that id completes the setup: the ACK
	// carries the same id and the LLQ now exists.
	resp := "000100010000" + mm[1] + "00000E10"
	out, err = exec.Command(kdig, "@"+host, "-p", port, "-b", src, "-y", "hmac-sha256:"+k.Name+":"+k.Base64(),
		"+ednsopt=1:"+resp, "mac.alice.btmm.example.", "AAAA").CombinedOutput()
	if err != nil {
		t.Fatalf("kdig: %v\n%s", err, out)
	}
	if !strings.Contains(strings.ReplaceAll(string(out), " ", ""), mm[1]) || srv.LLQs() != 1 {
		t.Fatalf("kdig LLQ ack: llqs=%d\n%s", srv.LLQs(), out)
	}
}

// freeUDPPort returns "127.0.0.1#PORT" for a UDP port that was free.
func freeUDPPort(t *testing.T) string {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return fmt.Sprintf("127.0.0.1#%d", c.LocalAddr().(*net.UDPAddr).Port)
}

func TestKdigDoT(t *testing.T) {
	kdig := testenv.RequireBinary(t, "kdig", "knot-dnsutils")
	dir := t.TempDir()
	_, addrs := startServer(t, dir, nil)
	host, port, _ := strings.Cut(addrs.TLS, ":")
	out, err := exec.Command(kdig, "@"+host, "-p", port, "+tls-ca="+filepath.Join(dir, "tls", "cert.pem"),
		"+tls-hostname=ns.btmm.example", "btmm.example.", "SOA").CombinedOutput()
	if err != nil {
		t.Fatalf("kdig +tls: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "NOERROR") || !strings.Contains(string(out), "SOA") || !strings.Contains(string(out), "TLS") {
		t.Fatalf("kdig +tls:\n%s", out)
	}
}
