package server_test

import (
	"net"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// rawExchange sends b over UDP to addr from a fresh socket and returns the
// answer and its raw bytes.
func rawExchange(t *testing.T, addr string, b []byte) (*dns.Msg, []byte) {
	t.Helper()
	conn, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write(b); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 65535)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	r := new(dns.Msg)
	if err := r.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	return r, buf[:n]
}

func signedUpdate(t *testing.T, k tsig.Key, ts time.Time, fudge uint16, rrs ...dns.RR) ([]byte, string) {
	t.Helper()
	m := new(dns.Msg)
	m.SetUpdate(zoneName)
	m.Insert(rrs)
	m.SetTsig(k.Name, k.Algorithm, fudge, ts.Unix())
	data, mac, err := dns.TsigGenerateWithProvider(m, k.Provider(), "", false)
	if err != nil {
		t.Fatal(err)
	}
	return data, mac
}

// checkBadTime asserts a signed BADTIME answer carrying the server's time.
func checkBadTime(t *testing.T, r *dns.Msg, raw []byte, k tsig.Key, reqMAC string, reqTime time.Time) {
	t.Helper()
	ts := r.IsTsig()
	if r.Rcode != dns.RcodeNotAuth || ts == nil || ts.Error != dns.RcodeBadTime {
		t.Fatalf("want NOTAUTH/BADTIME, got %v", r)
	}
	if ts.TimeSigned != uint64(reqTime.Unix()) {
		t.Errorf("BADTIME Time Signed %d, want the request's %d", ts.TimeSigned, reqTime.Unix())
	}
	st, ok := tsig.OtherTime(ts)
	if !ok || time.Until(st).Abs() > 30*time.Second {
		t.Errorf("BADTIME Other Data %q: server time %v, want about now", ts.OtherData, st)
	}
	// The error is signed with the request's MAC.
	if _, err := k.VerifyResponse(raw, reqMAC); err != nil {
		t.Errorf("BADTIME answer does not verify: %v", err)
	}
}

func TestBadTimeCarriesServerTime(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	for _, tc := range []struct {
		name  string
		age   time.Duration
		fudge uint16
	}{
		{"an hour old", time.Hour, 300},
		// The signer's fudge is capped by the server's (300 s).
		{"an hour old with fudge 65535", time.Hour, 65535},
		{"ten minutes ahead with fudge 3600", -10 * time.Minute, 3600},
	} {
		t.Run(tc.name, func(t *testing.T) {
			when := time.Now().Add(-tc.age)
			data, mac := signedUpdate(t, k, when, tc.fudge, rr(t, "x.alice.btmm.example. 60 IN A 192.0.2.1"))
			r, raw := rawExchange(t, addrs.DNS, data)
			checkBadTime(t, r, raw, k, mac, when)
			if q := signedQuery(t, addrs.DNS, k, "x.alice.btmm.example.", dns.TypeA); len(q.Answer) != 0 {
				t.Fatal("stale update applied")
			}
		})
	}
}

func TestReplayedUpdateRefused(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	now := time.Now()
	add, _ := signedUpdate(t, k, now, 300, rr(t, "x.alice.btmm.example. 60 IN A 192.0.2.1"))
	if r, _ := rawExchange(t, addrs.DNS, add); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("update: %v", r)
	}
	del := new(dns.Msg)
	del.SetUpdate(zoneName)
	del.RemoveName([]dns.RR{&dns.ANY{Hdr: dns.RR_Header{Name: "x.alice.btmm.example."}}})
	if r := update(t, addrs.DNS, k, 0, func(m *dns.Msg) { m.Ns = del.Ns }); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("delete: %v", r)
	}
	// The captured add, sent again: BADTIME, and the record stays deleted.
	r, raw := rawExchange(t, addrs.DNS, add)
	m := new(dns.Msg)
	m.Unpack(add)
	checkBadTime(t, r, raw, k, m.IsTsig().MAC, now)
	if q := signedQuery(t, addrs.DNS, k, "x.alice.btmm.example.", dns.TypeA); len(q.Answer) != 0 {
		t.Fatal("replayed update applied")
	}
}

func TestTruncatedMAC(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	data, _ := signedUpdate(t, k, time.Now(), 300, rr(t, "x.alice.btmm.example. 60 IN A 192.0.2.1"))
	m := new(dns.Msg)
	m.Unpack(data)
	ts := m.IsTsig()
	full := ts.MAC
	for _, tc := range []struct {
		octets int
		rcode  int
		code   uint16
	}{
		{16, dns.RcodeNotAuth, dns.RcodeBadTrunc}, // half of SHA-256: allowed by RFC 8945, below our minimum
		{15, dns.RcodeFormatError, 0},             // below half: malformed
		{33, dns.RcodeFormatError, 0},             // longer than the hash
	} {
		mac := full + "00"
		ts.MAC, ts.MACSize = mac[:2*tc.octets], uint16(tc.octets)
		b, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		r, _ := rawExchange(t, addrs.DNS, b)
		if r.Rcode != tc.rcode {
			t.Fatalf("%d-octet MAC: rcode %s, want %s", tc.octets, dns.RcodeToString[r.Rcode], dns.RcodeToString[tc.rcode])
		}
		if tc.code != 0 && (r.IsTsig() == nil || r.IsTsig().Error != tc.code) {
			t.Fatalf("%d-octet MAC: %v", tc.octets, r)
		}
	}
	if q := signedQuery(t, addrs.DNS, k, "x.alice.btmm.example.", dns.TypeA); len(q.Answer) != 0 {
		t.Fatal("update with a truncated MAC applied")
	}
}

func TestServerFudgeConfig(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), func(c *server.Config) { c.TSIGFudge = server.Duration(10 * time.Second) })
	k := addUser(t, srv, "alice", "")
	when := time.Now().Add(-30 * time.Second)
	data, mac := signedUpdate(t, k, when, 300, rr(t, "x.alice.btmm.example. 60 IN A 192.0.2.1"))
	r, raw := rawExchange(t, addrs.DNS, data)
	checkBadTime(t, r, raw, k, mac, when)
	if ts := r.IsTsig(); ts.Fudge != 10 {
		t.Errorf("answer's fudge %d, want the server's 10", ts.Fudge)
	}
}

// udpRecorder relays UDP between clients and a server and keeps every
// request, so that what an independent client (nsupdate, dig) signed can be
// sent again.
type udpRecorder struct {
	pc   net.PacketConn
	mu   sync.Mutex
	reqs [][]byte
}

func newUDPRecorder(t *testing.T, server string) *udpRecorder {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rec := &udpRecorder{pc: pc}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65535)
		for {
			n, client, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			req := append([]byte(nil), buf[:n]...)
			rec.mu.Lock()
			rec.reqs = append(rec.reqs, req)
			rec.mu.Unlock()
			go func() {
				up, err := net.Dial("udp", server)
				if err != nil {
					return
				}
				defer up.Close()
				up.Write(req)
				up.SetReadDeadline(time.Now().Add(10 * time.Second))
				b := make([]byte, 65535)
				if n, err := up.Read(b); err == nil {
					pc.WriteTo(b[:n], client)
				}
			}()
		}
	}()
	return rec
}

func (r *udpRecorder) requests() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.reqs...)
}

// TestReplayIndependentClients: nsupdate's and dig's own signed messages,
// captured on the way and sent again, are refused with BADTIME and change
// nothing.
func TestReplayIndependentClients(t *testing.T) {
	dig := testenv.RequireBinary(t, "dig", "bind9-dnsutils")
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	auth := []string{"-y", "hmac-sha256:" + k.Name + ":" + k.Base64()}
	rec := newUDPRecorder(t, addrs.DNS)
	out, err := nsupdate(t, auth, serverLine(rec.pc.LocalAddr().String())+
		"update add r.alice.btmm.example. 120 IN AAAA fd00::9\nsend\n")
	if err != nil {
		t.Fatalf("nsupdate: %v\n%s", err, out)
	}
	captured := rec.requests()
	if len(captured) == 0 {
		t.Fatal("nothing captured")
	}
	out, err = nsupdate(t, auth, serverLine(addrs.DNS)+"update delete r.alice.btmm.example. AAAA\nsend\n")
	if err != nil {
		t.Fatalf("nsupdate delete: %v\n%s", err, out)
	}
	for _, b := range captured {
		m := new(dns.Msg)
		if m.Unpack(b) != nil || m.IsTsig() == nil {
			t.Fatalf("captured message not signed")
		}
		r, raw := rawExchange(t, addrs.DNS, b)
		checkBadTime(t, r, raw, k, m.IsTsig().MAC, time.Unix(int64(m.IsTsig().TimeSigned), 0))
	}
	if q := signedQuery(t, addrs.DNS, k, "r.alice.btmm.example.", dns.TypeAAAA); len(q.Answer) != 0 {
		t.Fatalf("replayed nsupdate applied: %v", q.Answer)
	}

	// dig: a signed query, answered once, refused when replayed.
	host, port, _ := strings.Cut(rec.pc.LocalAddr().String(), ":")
	before := len(rec.requests())
	out2, err := exec.Command(dig, "@"+host, "-p", port, "-y", "hmac-sha256:"+k.Name+":"+k.Base64(),
		"+tries=1", "+time=10", "_dns-update._udp.alice.btmm.example.", "SRV").CombinedOutput()
	if err != nil || !strings.Contains(string(out2), "status: NOERROR") {
		t.Fatalf("dig: %v\n%s", err, out2)
	}
	reqs := rec.requests()[before:]
	if len(reqs) != 1 {
		t.Fatalf("dig sent %d messages", len(reqs))
	}
	m := new(dns.Msg)
	m.Unpack(reqs[0])
	r, raw := rawExchange(t, addrs.DNS, reqs[0])
	checkBadTime(t, r, raw, k, m.IsTsig().MAC, time.Unix(int64(m.IsTsig().TimeSigned), 0))
}

// TestDigTruncatedMAC: dig signing with a MAC truncated to 128 bits
// (hmac-sha256-128, allowed by RFC 8945 §5.2.2.1) gets BADTRUNC.
func TestDigTruncatedMAC(t *testing.T) {
	dig := testenv.RequireBinary(t, "dig", "bind9-dnsutils")
	srv, addrs := startServer(t, t.TempDir(), nil)
	k := addUser(t, srv, "alice", "")
	host, port, _ := strings.Cut(addrs.DNS, ":")
	out, _ := exec.Command(dig, "@"+host, "-p", port, "-y", "hmac-sha256-128:"+k.Name+":"+k.Base64(),
		"+tries=1", "+time=10", "_dns-update._udp.alice.btmm.example.", "SRV").CombinedOutput()
	t.Logf("dig:\n%s", out)
	if !strings.Contains(string(out), "BADTRUNC") || !strings.Contains(string(out), "status: NOTAUTH") {
		t.Fatalf("dig with a truncated MAC: no BADTRUNC / NOTAUTH:\n%s", out)
	}
}
