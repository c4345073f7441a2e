package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/miniupnpd"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

const (
	zone   = "btmm.example."
	domain = "alice.btmm.example."
	realm  = "BTMM.EXAMPLE"
)

var demo = os.Getenv("BTMM_DEMO") == "1"

// say narrates in demo mode and logs otherwise.
func say(t *testing.T, format string, args ...any) {
	t.Helper()
	if demo {
		fmt.Printf("\n\033[1m== "+format+"\033[0m\n", args...)
	} else {
		t.Logf(format, args...)
	}
}

func show(t *testing.T, label, out string) {
	t.Helper()
	if demo {
		fmt.Printf("$ %s\n%s\n", label, strings.TrimRight(out, "\n"))
	}
}

// binaries returns the directory with btmm-dnsd, btmmd and btmmctl:
// BTMM_BIN_DIR (make builds it before the VM tier, where compiling is slow),
// else a fresh go build.
func binaries(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("BTMM_BIN_DIR"); d != "" {
		for _, b := range []string{"btmm-dnsd", "btmmd", "btmmctl"} {
			if _, err := os.Stat(filepath.Join(d, b)); err != nil {
				t.Fatalf("BTMM_BIN_DIR=%s lacks %s (run make build): %v", d, b, err)
			}
		}
		return d
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/btmm-dnsd", "./cmd/btmmd", "./cmd/btmmctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

// logBuf collects a daemon's output for failure messages.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type daemon struct {
	name string
	cmd  *exec.Cmd
	log  *logBuf
}

func start(t *testing.T, ns *netns.NS, name string, bin string, args ...string) *daemon {
	t.Helper()
	d := &daemon{name: name, log: &logBuf{}}
	d.cmd = ns.Command(context.Background(), bin, args...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := ns.StartCmd(d.cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- %s log ---\n%s", name, d.log)
		}
	})
	return d
}

func waitFor(t *testing.T, what string, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: not after %v: %v", what, timeout, err)
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

// rendezvous starts btmm-dnsd for zone in the lab's inet namespace and
// returns the path of user alice's TSIG key file.
func rendezvous(t *testing.T, l *lab.Lab, bins, dir string) string {
	t.Helper()
	conf := filepath.Join(dir, "dnsd.toml")
	writeFile(t, conf, fmt.Sprintf(`zone = %q
server_name = "ns.%s"
server_addrs = [%q]
data_dir = %q
listen = "%s:53"
listen_tls = ""
`, zone, zone, lab.InetAddr, filepath.Join(dir, "dnsd"), lab.InetAddr), 0o644)
	out, err := exec.Command(filepath.Join(bins, "btmm-dnsd"), "-config", conf, "adduser", "alice").Output()
	if err != nil {
		t.Fatalf("btmm-dnsd adduser: %v", err)
	}
	keyFile := filepath.Join(dir, "alice.key")
	writeFile(t, keyFile, string(out), 0o600)
	start(t, l.Inet, "btmm-dnsd", filepath.Join(bins, "btmm-dnsd"), "-config", conf)
	waitFor(t, "btmm-dnsd listening", 10*time.Second, func() error {
		return l.Inet.Do(func() error {
			c, err := net.DialTimeout("tcp", lab.InetAddr+":53", 200*time.Millisecond)
			if err == nil {
				c.Close()
			}
			return err
		})
	})
	return keyFile
}

type host struct {
	name string
	ns   *netns.NS
	sock string
	d    *daemon
}

func (h *host) status(t *testing.T, bins string) (*agent.Status, error) {
	out, err := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "--json", "status")
	if err != nil {
		return nil, err
	}
	var st agent.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("btmmctl --json: %w: %s", err, out)
	}
	return &st, nil
}

// TestTwoHostsBehindNATs is the system test: host1 and host2, each behind
// its own NAT, register with btmm-dnsd, discover each other by LLQ, key with
// Kerberos through krb5kdc, and ping each other's ULA over ESP-in-UDP.
func TestTwoHostsBehindNATs(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	bins := binaries(t)
	dir := t.TempDir()

	say(t, "Lab: inet (rendezvous DNS + KDC at %s), gw1/gw2 NAT gateways, host1/host2 behind them", lab.InetAddr)
	l := lab.New(t)

	say(t, "btmm-dnsd: zone %s, user alice (TSIG key from `btmm-dnsd adduser alice`)", zone)
	keyFile := rendezvous(t, l, bins, dir)

	say(t, "krb5kdc: realm %s with host principals", realm)
	kdc := krbtest.StartIn(t, realm, l.Inet, netip.MustParseAddr(lab.InetAddr), 88)

	say(t, "miniupnpd (NAT-PMP/PCP) on both NAT gateways")
	var gws []*miniupnpd.Daemon
	for _, g := range []struct {
		gw  *netns.NS
		lan string
	}{{l.GW1, "192.168.1.0/24"}, {l.GW2, "192.168.2.0/24"}} {
		gws = append(gws, miniupnpd.StartT(t, g.gw, miniupnpd.Options{WAN: "wan", LAN: "lan", LANNet: netip.MustParsePrefix(g.lan), KeepRuleset: true}))
	}

	hosts := []*host{{name: "host1", ns: l.Host1}, {name: "host2", ns: l.Host2}}
	for _, h := range hosts {
		principal := "host/" + h.name + "." + strings.TrimSuffix(domain, ".")
		kdc.AddPrincipal(t, principal)
		ktPath, _ := kdc.Keytab(t, h.name+".keytab", principal)
		h.sock = filepath.Join(dir, h.name+".sock")
		conf := filepath.Join(dir, h.name+".toml")
		writeFile(t, conf, fmt.Sprintf(`host = %q
domain = %q
state_file = %q
control_socket = %q
log_level = "debug"

[dns]
key_file = %q
server = "%s:53"
resolver = "%s:53"

[nat]
mode = "auto"

[keying]
keytab = %q
krb5_conf = %q
realm = %q
`, h.name, domain, filepath.Join(dir, h.name+".identity.json"), h.sock, keyFile, lab.InetAddr, lab.InetAddr, ktPath, kdc.Krb5Conf, realm), 0o644)
		say(t, "btmmd on %s", h.name)
		h.d = start(t, h.ns, "btmmd "+h.name, filepath.Join(bins, "btmmd"), "-config", conf)
	}

	say(t, "Waiting for each host to discover, key and program its peer")
	sts := map[string]*agent.Status{}
	for _, h := range hosts {
		waitFor(t, h.name+" has a keyed peer in the kernel", 90*time.Second, func() error {
			st, err := h.status(t, bins)
			if err != nil {
				return err
			}
			if len(st.Peers) != 1 || !st.Peers[0].Keyed || !st.Peers[0].InKernel {
				return fmt.Errorf("peers: %+v", st.Peers)
			}
			sts[h.name] = st
			return nil
		})
		out, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "status")
		show(t, "btmmctl status   # on "+h.name, out)
	}
	if sts["host1"].Peers[0].ULA != sts["host2"].ULA || sts["host2"].Peers[0].ULA != sts["host1"].ULA {
		t.Fatalf("hosts see the wrong ULAs: host1 sees %v (host2 is %v), host2 sees %v (host1 is %v)",
			sts["host1"].Peers[0].ULA, sts["host2"].ULA, sts["host2"].Peers[0].ULA, sts["host1"].ULA)
	}
	for _, st := range sts {
		if out := fmt.Sprint(st); strings.Contains(out, "secret") {
			t.Fatalf("status mentions a secret: %s", out)
		}
	}
	out, _ := l.Host1.Run("ip", "xfrm", "state")
	show(t, "ip xfrm state   # on host1 (keys shown by iproute2, not by btmm)", out)

	say(t, "host1 pings host2's ULA %s through both NATs over ESP-in-UDP", sts["host2"].ULA)
	res, err := l.Host1.Run("ping", "-6", "-c", "3", "-i", "0.3", "-W", "3", sts["host2"].ULA.String())
	show(t, "ping -6 "+sts["host2"].ULA.String(), res)
	if err != nil || !strings.Contains(res, " 0% packet loss") {
		t.Fatalf("ping host1 -> host2 ULA: %v\n%s", err, res)
	}
	res, err = l.Host2.Run("ping", "-6", "-c", "2", "-i", "0.3", "-W", "3", sts["host1"].ULA.String())
	if err != nil || !strings.Contains(res, " 0% packet loss") {
		t.Fatalf("ping host2 -> host1 ULA: %v\n%s", err, res)
	}

	// Mobility: host2's NAT gets a new public address while a TCP
	// connection between the ULAs is open. The connection must keep going,
	// and host1's SAs must move to the new address without rekeying.
	say(t, "Mobility: a TCP connection host1 -> host2 (between ULAs) stays open while host2's NAT changes its public address")
	echo := startEcho(t, l.Host2, sts["host2"].ULA)
	conn := dialEcho(t, l.Host1, echo)
	defer conn.Close()
	roundTrip(t, conn, "before the move")
	before := sts["host1"].Peers[0]

	// (Deleting the primary address would take a secondary with it: swap.)
	l.GW2.MustRun(t, "ip", "addr", "del", lab.GW2WAN+"/24", "dev", "wan")
	l.GW2.MustRun(t, "ip", "addr", "add", "11.2.0.3/24", "dev", "wan")
	l.GW2.MustRun(t, "ip", "route", "replace", "default", "via", "11.2.0.1", "dev", "wan")
	wanAddr, _ := l.GW2.Run("ip", "-br", "-4", "addr", "show", "dev", "wan")
	show(t, "ip -br -4 addr show dev wan   # on gw2, was "+lab.GW2WAN+"; miniupnpd now announces (SIGUSR1)", wanAddr)
	if err := gws[1].Announce(); err != nil {
		t.Fatal(err)
	}
	// Keep the connection busy while the move propagates: NAT-PMP
	// re-query -> DNS update -> LLQ push -> SA move on host1.
	want := netip.MustParseAddrPort("11.2.0.3:4500")
	var after agent.PeerStatus
	waitFor(t, "host1 follows host2 to 11.2.0.3", 60*time.Second, func() error {
		roundTrip(t, conn, "during the move")
		st, err := hosts[0].status(t, bins)
		if err != nil {
			return err
		}
		if len(st.Peers) != 1 || st.Peers[0].Outer != want {
			return fmt.Errorf("host1's peers: %+v", st.Peers)
		}
		after = st.Peers[0]
		return nil
	})
	// Keep traffic flowing for a while: late packets from the old address
	// must not pull host1 back to it.
	for end := time.Now().Add(4 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		roundTrip(t, conn, "after the move")
	}
	st1, err := hosts[0].status(t, bins)
	if err != nil {
		t.Fatal(err)
	}
	if len(st1.Peers) != 1 || st1.Peers[0].Outer != want {
		t.Fatalf("after the move host1 sends to %v (source %s), want %v", st1.Peers[0].Outer, st1.Peers[0].OuterBy, want)
	}
	after = st1.Peers[0]
	if after.OutSPI != before.OutSPI || after.InSPI != before.InSPI {
		t.Fatalf("the move rekeyed: SPIs out %#x -> %#x, in %#x -> %#x", before.OutSPI, after.OutSPI, before.InSPI, after.InSPI)
	}
	out, _ = hosts[0].ns.Run(filepath.Join(bins, "btmmctl"), "-socket", hosts[0].sock, "peers")
	show(t, "btmmctl peers   # on host1: host2 now at 11.2.0.3, same SPIs, learned from "+after.OuterBy, out)
	say(t, "The TCP connection survived the move; SAs moved in place (no rekey)")
}

// startEcho listens on [ula]:7 inside ns and echoes every line.
func startEcho(t *testing.T, ns *netns.NS, ula netip.Addr) netip.AddrPort {
	t.Helper()
	var l net.Listener
	if err := ns.Do(func() (err error) {
		l, err = net.Listen("tcp6", netip.AddrPortFrom(ula, 7007).String())
		return
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	return netip.AddrPortFrom(ula, 7007)
}

func dialEcho(t *testing.T, ns *netns.NS, to netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	if err := ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp6", to.String(), 10*time.Second)
		return
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

var rtSeq int

// roundTrip sends a numbered line and expects it back within 10 s (TCP
// retransmits across a brief gap; a reset or a timeout fails the test).
func roundTrip(t *testing.T, c net.Conn, when string) {
	t.Helper()
	rtSeq++
	msg := fmt.Sprintf("ping %d\n", rtSeq)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("TCP between ULAs broke %s: %v", when, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("TCP between ULAs broke %s: %q, %v", when, buf, err)
	}
}
