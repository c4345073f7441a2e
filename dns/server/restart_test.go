package server_test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// buildDaemon builds the real btmm-dnsd binary once per test.
func buildDaemon(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the btmm-dnsd binary; skipped under -short")
	}
	bin := filepath.Join(t.TempDir(), "btmm-dnsd")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/btmm/btmm/cmd/btmm-dnsd").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func freeDNSPort(t *testing.T) string {
	t.Helper()
	for range 50 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := pc.LocalAddr().String()
		ln, err := net.Listen("tcp", addr)
		pc.Close()
		if err == nil {
			ln.Close()
			return addr
		}
	}
	t.Fatal("no free port")
	return ""
}

type daemon struct {
	t    *testing.T
	bin  string
	conf string
	addr string
	cmd  *exec.Cmd
}

func (d *daemon) start() {
	d.t.Helper()
	d.cmd = exec.Command(d.bin, "-config", d.conf)
	d.cmd.Stderr = os.Stderr
	if !testing.Verbose() {
		d.cmd.Stderr = nil
	}
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	cmd := d.cmd
	d.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		m := new(dns.Msg)
		m.SetQuestion(zoneName, dns.TypeSOA)
		if r, _, err := (&dns.Client{Timeout: 200 * time.Millisecond}).Exchange(m, d.addr); err == nil && r.Rcode == dns.RcodeSuccess {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.t.Fatal("btmm-dnsd did not come up")
}

func (d *daemon) kill9() {
	d.cmd.Process.Signal(syscall.SIGKILL)
	d.cmd.Wait()
}

func TestKill9Durability(t *testing.T) {
	bin := buildDaemon(t)
	dir := t.TempDir()
	addr := freeDNSPort(t)
	conf := filepath.Join(dir, "dnsd.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`zone = "btmm.example."
data_dir = %q
listen = %q
[update_lease]
min = "1s"
max = "2h"
`, filepath.Join(dir, "data"), addr)), 0o644)

	// adduser prints the key in BIND format.
	out, err := exec.Command(bin, "-config", conf, "adduser", "alice").Output()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := tsig.ParseBIND(out)
	if err != nil || len(keys) != 1 {
		t.Fatalf("adduser output %q: %v", out, err)
	}
	k := keys[0]
	if fi, err := os.Stat(filepath.Join(dir, "data", "keys", "alice.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}

	d := &daemon{t: t, bin: bin, conf: conf, addr: addr}
	d.start()

	// An LLQ over UDP, to survive the crash.
	c := newLLQClient(t, addr, k)
	id, _ := c.setup("live.alice.btmm.example.", dns.TypeA)

	// Acknowledged updates in a tight loop; kill -9 right after the last ack.
	const n = 40
	for i := range n {
		r := update(t, addr, k, 7200, func(m *dns.Msg) {
			m.Insert([]dns.RR{rr(t, fmt.Sprintf("h%d.alice.btmm.example. 60 IN A 192.0.2.%d", i, i+1))})
		})
		if r.Rcode != dns.RcodeSuccess {
			t.Fatalf("update %d: %s", i, dns.RcodeToString[r.Rcode])
		}
	}
	// A short-lease record that must expire while the server is down.
	update(t, addr, k, 1, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, "short.alice.btmm.example. 60 IN A 192.0.2.200")}) })
	d.kill9()
	time.Sleep(1200 * time.Millisecond) // past the 1 s lease, on the wall clock

	d.start()
	for i := range n {
		q := signedQuery(t, addr, k, fmt.Sprintf("h%d.alice.btmm.example.", i), dns.TypeA)
		if len(q.Answer) != 1 {
			t.Fatalf("acknowledged update %d lost after kill -9", i)
		}
	}
	// The expired record is removed (at startup or within a moment).
	deadline := time.Now().Add(3 * time.Second)
	for {
		q := signedQuery(t, addr, k, "short.alice.btmm.example.", dns.TypeA)
		if len(q.Answer) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease did not run on wall-clock time across the restart: %v", q.Answer)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The LLQ survived: an update produces an event to the same socket.
	update(t, addr, k, 7200, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, "live.alice.btmm.example. 60 IN A 192.0.2.77")}) })
	for {
		ev, err := c.recv(5 * time.Second)
		if err != nil {
			t.Fatalf("no event after restart: %v", err)
		}
		if o, ok := llq.Option(ev); ok && o.Opcode == llq.OpEvent && o.Id == id {
			break
		}
	}
	// deluser removes the key file.
	if out, err := exec.Command(bin, "-config", conf, "deluser", "alice").CombinedOutput(); err != nil {
		t.Fatalf("deluser: %v %s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "data", "keys", "alice.key")); !os.IsNotExist(err) {
		t.Fatalf("key file still there: %v", err)
	}
}
