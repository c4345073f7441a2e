package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
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
		for _, b := range []string{"btmm-dnsd", "btmmd", "btmmctl", "btmm-relay"} {
			if _, err := os.Stat(filepath.Join(d, b)); err != nil {
				t.Fatalf("BTMM_BIN_DIR=%s lacks %s (run make build): %v", d, b, err)
			}
		}
		return d
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/btmm-dnsd", "./cmd/btmmd", "./cmd/btmmctl", "./cmd/btmm-relay")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

type daemon struct {
	name string
	cmd  *exec.Cmd
	log  *testenv.SyncBuffer
}

func start(t *testing.T, ns *netns.NS, name string, bin string, args ...string) *daemon {
	t.Helper()
	if filepath.Base(bin) == "btmmd" {
		checkNamesConfined(t, args)
	}
	d := &daemon{name: name, log: &testenv.SyncBuffer{}}
	d.cmd = ns.Command(context.Background(), bin, args...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := ns.StartCmd(d.cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- %s log ---\n%s", name, d.log)
		}
		// BTMM_E2E_LOGDIR: every daemon's log is written there at the
		// end, passed or not (to see why a run was slow).
		if dir := os.Getenv("BTMM_E2E_LOGDIR"); dir != "" {
			os.WriteFile(filepath.Join(dir, strings.ReplaceAll(t.Name()+" "+name, " ", "_")+".log"), []byte(d.log.String()), 0o644)
		}
	})
	return d
}

// namesSection keeps a test's btmmd out of this machine's /etc/hosts: the
// names feature is on by default, and a btmmd in a network namespace still
// shares the file system (a killed test would leave its block behind). Each
// host gets its own hosts file in the test's directory; its stub listens on
// the namespace's own loopback.
func namesSection(dir, host string) string {
	return fmt.Sprintf("\n[names]\nhosts_file = %q\n", filepath.Join(dir, host+".hosts"))
}

// checkNamesConfined fails the test before a btmmd starts with a config
// that would write this machine's /etc/hosts (no [names] section with a
// hosts_file of the test's own, and names not off).
func checkNamesConfined(t *testing.T, args []string) {
	t.Helper()
	i := slices.Index(args, "-config")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("btmmd started without -config: it would use /etc/btmm/btmmd.toml and /etc/hosts")
	}
	b, err := os.ReadFile(args[i+1])
	if err != nil {
		t.Fatal(err)
	}
	conf := string(b)
	if !strings.Contains(conf, "[names]") || strings.Contains(conf, `hosts_file = "/etc/hosts"`) ||
		!strings.Contains(conf, "hosts_file =") && !strings.Contains(conf, `mode = "off"`) {
		t.Fatalf("test config %s lets btmmd write this machine's /etc/hosts: add namesSection (a hosts_file in the test's directory)", args[i+1])
	}
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

// rendezvous starts btmm-dnsd for zone in the lab's inet namespace with
// user alice, and returns a function that makes a host's own key
// (`btmm-dnsd addhost alice HOST`) and returns its file.
func rendezvous(t *testing.T, l *lab.Lab, bins, dir string) func(host string) string {
	return rendezvousWith(t, l, bins, dir, "")
}

// rendezvousWith is rendezvous with extra TOML appended to btmm-dnsd's config.
func rendezvousWith(t *testing.T, l *lab.Lab, bins, dir, extra string) func(host string) string {
	t.Helper()
	return rendezvousOn(t, l, bins, dir, lab.InetAddr+":53", extra)
}

// rendezvousOn is rendezvousWith listening on listen ("[::]:53": every
// address of inet, IPv6 too).
func rendezvousOn(t *testing.T, l *lab.Lab, bins, dir, listen, extra string) func(host string) string {
	t.Helper()
	conf := filepath.Join(dir, "dnsd.toml")
	writeFile(t, conf, fmt.Sprintf(`zone = %q
server_name = "ns.%s"
server_addrs = [%q]
data_dir = %q
listen = %q
listen_tls = ""
`, zone, zone, lab.InetAddr, filepath.Join(dir, "dnsd"), listen)+extra, 0o644)
	out, err := exec.Command(filepath.Join(bins, "btmm-dnsd"), "-config", conf, "adduser", "alice").Output()
	if err != nil {
		t.Fatalf("btmm-dnsd adduser: %v", err)
	}
	writeFile(t, filepath.Join(dir, "alice.key"), string(out), 0o600)
	start(t, l.Inet, "btmm-dnsd", filepath.Join(bins, "btmm-dnsd"), "-config", conf)
	testenv.WaitFor(t, "btmm-dnsd listening", 60*time.Second, func() error {
		return l.Inet.Do(func() error {
			c, err := net.DialTimeout("tcp", lab.InetAddr+":53", time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
	})
	return func(host string) string {
		out, err := exec.Command(filepath.Join(bins, "btmm-dnsd"), "-config", conf, "addhost", "alice", host).Output()
		if err != nil {
			t.Fatalf("btmm-dnsd addhost alice %s: %v", host, err)
		}
		keyFile := filepath.Join(dir, host+".key")
		writeFile(t, keyFile, string(out), 0o600)
		return keyFile
	}
}

type host struct {
	name      string
	ns        *netns.NS
	dataplane string
	sock      string
	d         *daemon
}

// peer returns the peer named name in st, or fails.
func peer(t *testing.T, st *agent.Status, name string) agent.PeerStatus {
	t.Helper()
	for _, p := range st.Peers {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("%s does not list peer %s: %+v", st.Host, name, st.Peers)
	return agent.PeerStatus{}
}

func (h *host) status(t *testing.T, bins string) (*agent.Status, error) {
	// btmmd's own status type over its control socket (a file: reachable
	// from any namespace); `btmmctl --json` prints the documented schema,
	// which TestTwoHostsBehindNATs checks separately.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return agent.FetchStatus(ctx, h.sock)
}

// TestTwoHostsBehindNATs is the system test: host1 and host2, each behind
// its own NAT, register with btmm-dnsd, discover each other by LLQ, key with
// Kerberos through krb5kdc, and ping each other's ULA over ESP-in-UDP.
func TestTwoHostsBehindNATs(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	t.Parallel() // its own lab; overlaps the roaming tests' waits (keepalive idle, offline)
	say(t, "Lab: inet (rendezvous DNS + KDC at %s), gw1/gw2 NAT gateways, host1/host2 behind them", lab.InetAddr)
	s := newSystem(t)
	l, bins, dir := s.l, s.bins, s.dir

	say(t, "miniupnpd (NAT-PMP/PCP) on both NAT gateways")
	s.upnp(t, l.GW1, l.GW2)
	gws := []*miniupnpd.Daemon{s.gws[l.GW1], s.gws[l.GW2]}

	var hosts []*host
	for _, h := range []struct {
		name string
		ns   *netns.NS
		dp   string
	}{{"host1", l.Host1, "xfrm"}, {"host2", l.Host2, "xfrm"}, {"pub", l.Pub, "ebpf"}} {
		say(t, "btmmd on %s (%s dataplane)", h.name, h.dp)
		hosts = append(hosts, s.startHost(t, h.name, h.ns, hostConf{dataplane: h.dp}))
	}

	say(t, "Waiting for each host to discover, key and program its peers")
	sts := s.keyed(t, hosts...)
	for _, h := range hosts {
		out, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "status")
		show(t, "btmmctl status   # on "+h.name, out)
	}
	for _, h := range hosts {
		for _, o := range hosts {
			if o != h && peer(t, sts[h.name], o.name).ULA != sts[o.name].ULA {
				t.Fatalf("%s sees %s at ULA %v, but %s is %v", h.name, o.name, peer(t, sts[h.name], o.name).ULA, o.name, sts[o.name].ULA)
			}
		}
	}
	// Names: each host's own hosts file (namesSection) lists the others.
	for _, h := range hosts {
		testenv.WaitFor(t, h.name+"'s hosts file lists its peers", 10*time.Second, func() error {
			b, err := os.ReadFile(filepath.Join(dir, h.name+".hosts"))
			if err != nil {
				return err
			}
			for _, o := range hosts {
				line := fmt.Sprintf("%s\t%s.%s %s\n", sts[o.name].ULA, o.name, strings.TrimSuffix(domain, "."), o.name)
				if !strings.Contains(string(b), line) {
					return fmt.Errorf("no line %q in:\n%s", line, b)
				}
			}
			return nil
		})
	}
	if ext := sts["pub"].NAT.External; ext != netip.MustParseAddrPort(lab.PubAddr+":4500") {
		t.Fatalf("pub publishes %v, want its own public address %s:4500 (status %q)", ext, lab.PubAddr, sts["pub"].NAT.Status)
	}
	if ext := sts["host1"].NAT.External; ext.Addr() != netip.MustParseAddr(lab.GW1WAN) {
		t.Fatalf("host1 publishes %v, want gw1's public address %s (status %q)", ext, lab.GW1WAN, sts["host1"].NAT.Status)
	}
	// No secret in btmmctl's output or btmmd's log: neither the TSIG key
	// nor any ESP key the kernel holds (`ip xfrm state` shows those to root).
	var secrets []string
	for _, h := range hosts {
		kf, err := os.ReadFile(filepath.Join(dir, h.name+".key"))
		if err != nil {
			t.Fatal(err)
		}
		if m := regexp.MustCompile(`secret "([^"]+)"`).FindSubmatch(kf); m != nil {
			secrets = append(secrets, string(m[1]))
		}
	}
	for _, h := range hosts[:2] {
		xs, _ := h.ns.Run("ip", "xfrm", "state")
		for _, m := range regexp.MustCompile(`aead \S+ 0x([0-9a-f]+)`).FindAllStringSubmatch(xs, -1) {
			secrets = append(secrets, m[1])
		}
	}
	if len(secrets) < len(hosts)+2*2 {
		t.Fatalf("found %d secrets to look for, want the hosts' TSIG keys and the ESP keys of host1 and host2", len(secrets))
	}
	for _, h := range hosts {
		human, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "status")
		js, _ := h.ns.Run(filepath.Join(bins, "btmmctl"), "-socket", h.sock, "--json", "status")
		for _, sec := range secrets {
			for what, text := range map[string]string{"btmmctl status": human, "btmmctl --json": js, "btmmd log": h.d.log.String()} {
				if strings.Contains(strings.ToLower(text), strings.ToLower(sec)) {
					t.Fatalf("%s on %s shows key material", what, h.name)
				}
			}
		}
	}
	out, _ := l.Host1.Run("ip", "xfrm", "state")
	show(t, "ip xfrm state   # on host1 (keys shown by iproute2, not by btmm)", out)

	say(t, "host1 pings host2's ULA %s through both NATs over ESP-in-UDP", sts["host2"].ULA)
	res, err := l.Host1.Run("ping", "-6", "-c", "3", "-i", "0.3", "-w", "10", sts["host2"].ULA.String())
	show(t, "ping -6 "+sts["host2"].ULA.String(), res)
	if err != nil || !strings.Contains(res, " 0% packet loss") {
		t.Fatalf("ping host1 -> host2 ULA: %v\n%s", err, res)
	}
	say(t, "Every pair, both ways: host1/host2 (xfrm, behind NATs) and pub (eBPF dataplane, public address)")
	for _, h := range hosts {
		for _, o := range hosts {
			if o == h {
				continue
			}
			res, err := h.ns.Run("ping", "-6", "-c", "2", "-i", "0.3", "-w", "10", sts[o.name].ULA.String())
			if err != nil || !strings.Contains(res, " 0% packet loss") {
				t.Fatalf("ping %s -> %s ULA: %v\n%s", h.name, o.name, err, res)
			}
		}
	}
	// btmmctl ping by name through the tunnel (xfrm to host2 behind gw2,
	// eBPF to pub), btmmctl peers shows every peer healthy, and --json is
	// the documented schema.
	ctl := func(h *host, args ...string) (string, error) {
		return h.ns.Run(filepath.Join(bins, "btmmctl"), append([]string{"-socket", h.sock}, args...)...)
	}
	for _, o := range []string{"host2", "pub"} {
		out, err := ctl(hosts[0], "ping", "-c", "2", "-i", "0.2", o)
		show(t, "btmmctl ping -c 2 "+o+"   # on host1: ICMPv6 from host1's ULA through the tunnel", out)
		if err != nil || !strings.Contains(out, "pong from "+o) || !strings.Contains(out, "via direct") || strings.Contains(out, "did not move") {
			t.Fatalf("btmmctl ping %s: %v\n%s", o, err, out)
		}
	}
	out, err = ctl(hosts[0], "--json", "ping", "-c", "1", "host2.alice.btmm.example")
	var pj struct {
		OK       bool    `json:"ok"`
		RTT      float64 `json:"rtt_seconds"`
		InTunnel bool    `json:"in_tunnel"`
		External string  `json:"external"`
		Path     struct {
			Kind, Local, Remote string
		} `json:"path"`
	}
	if err != nil || json.Unmarshal([]byte(out), &pj) != nil || !pj.OK || pj.RTT <= 0 || !pj.InTunnel || pj.Path.Kind != "direct" ||
		pj.Path.Remote != peer(t, sts["host1"], "host2").Outer.String() || !strings.HasPrefix(pj.External, lab.GW1WAN+":") {
		t.Fatalf("btmmctl --json ping host2: %v %+v\n%s", err, pj, out)
	}
	for _, h := range hosts {
		out, err := ctl(h, "--json", "peers")
		var ps struct {
			Schema int `json:"schema"`
			Peers  []struct {
				Name     string `json:"name"`
				InKernel bool   `json:"in_kernel"`
				Health   struct {
					State         string `json:"state"`
					Reason        string `json:"reason"`
					LastHandshake string `json:"last_handshake"`
				} `json:"health"`
			} `json:"peers"`
		}
		if err != nil || json.Unmarshal([]byte(out), &ps) != nil || ps.Schema != 1 || len(ps.Peers) != 2 {
			t.Fatalf("btmmctl --json peers on %s: %v\n%s", h.name, err, out)
		}
		for _, p := range ps.Peers {
			if p.Health.State != "ok" || !p.InKernel || p.Health.LastHandshake == "" {
				t.Errorf("%s sees %s as %+v", h.name, p.Name, p)
			}
		}
	}
	// pub's btmmd pinned its maps in its own mount namespace (`ip netns
	// exec` remounts /sys), so look from there.
	pubPID := fmt.Sprint(hosts[2].d.cmd.Process.Pid)
	dump, err := exec.Command("nsenter", "-t", pubPID, "-m", "-n", "-r", "bpftool", "map", "dump", "pinned", "/sys/fs/bpf/btmm/peer_by_ula").CombinedOutput()
	show(t, "bpftool map dump pinned /sys/fs/bpf/btmm/peer_by_ula   # on pub: one entry per peer ULA", string(dump))
	if err != nil || strings.Count(string(dump), "\"key\"")+strings.Count(string(dump), "key:") != 2 {
		t.Fatalf("pub's peer map does not hold its 2 peers: %v\n%s", err, dump)
	}

	// Mobility: host2's NAT gets a new public address while a TCP
	// connection between the ULAs is open. The connection must keep going,
	// and host1's SAs must move to the new address without rekeying.
	say(t, "Mobility: a TCP connection host1 -> host2 (between ULAs) stays open while host2's NAT changes its public address")
	echo := startEcho(t, l.Host2, sts["host2"].ULA)
	conn := dialEcho(t, l.Host1, echo)
	defer conn.Close()
	roundTrip(t, conn, "before the move")
	before := peer(t, sts["host1"], "host2")

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
	testenv.WaitFor(t, "host1 follows host2 to 11.2.0.3", 60*time.Second, func() error {
		roundTrip(t, conn, "during the move")
		st, err := hosts[0].status(t, bins)
		if err != nil {
			return err
		}
		if p := peer(t, st, "host2"); p.Outer != want {
			return fmt.Errorf("host1 sends to host2 at %v", p.Outer)
		}
		after = peer(t, st, "host2")
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
	if p := peer(t, st1, "host2"); p.Outer != want {
		t.Fatalf("after the move host1 sends to %v (source %s), want %v", p.Outer, p.OuterBy, want)
	}
	after = peer(t, st1, "host2")
	if after.OutSPI != before.OutSPI || after.InSPI != before.InSPI {
		t.Fatalf("the move rekeyed: SPIs out %#x -> %#x, in %#x -> %#x", before.OutSPI, after.OutSPI, before.InSPI, after.InSPI)
	}
	out, _ = hosts[0].ns.Run(filepath.Join(bins, "btmmctl"), "-socket", hosts[0].sock, "peers")
	show(t, "btmmctl peers   # on host1: host2 now at 11.2.0.3, same SPIs, learned from "+after.OuterBy, out)
	say(t, "The TCP connection survived the move; SAs moved in place (no rekey)")

	// Clean shutdown: host1's btmmd removes its kernel state, its NAT
	// mapping and its DNS records, and the others see it leave.
	say(t, "Clean shutdown of btmmd on host1 (SIGTERM); `btmmctl watch` on host2 follows")
	watch := &testenv.SyncBuffer{}
	wcmd := l.Host2.Command(context.Background(), filepath.Join(bins, "btmmctl"), "-socket", hosts[1].sock, "watch", "--json")
	wcmd.Stdout, wcmd.Stderr = watch, watch
	if err := l.Host2.StartCmd(wcmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wcmd.Process.Kill(); wcmd.Wait() })
	testenv.WaitFor(t, "btmmctl watch is connected", 10*time.Second, func() error {
		if !strings.Contains(watch.String(), `"type":"watching"`) {
			return fmt.Errorf("watch printed %q", watch.String())
		}
		return nil
	})
	conn.Close()
	h1 := hosts[0]
	h1.d.cmd.Process.Signal(syscall.SIGTERM)
	exited := make(chan error, 1)
	go func() { exited <- h1.d.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("btmmd on host1 exited with %v", err)
		}
	case <-time.After(45 * time.Second): // the unit's TimeoutStopSec (TCG is slow)
		t.Fatal("btmmd on host1 did not stop within 45 s of SIGTERM")
	}
	for _, what := range [][]string{{"ip", "xfrm", "state"}, {"ip", "xfrm", "policy"}, {"ip", "-6", "route", "show", "proto", "98"}, {"ip", "link", "show", "btmm0"}} {
		out, _ := l.Host1.Run(what[0], what[1:]...)
		if strings.TrimSpace(out) != "" && !strings.Contains(out, "does not exist") {
			t.Errorf("after btmmd stopped, `%s` on host1 shows:\n%s", strings.Join(what, " "), out)
		}
	}
	if rules, err := gws[0].Rules(); err != nil || strings.Contains(rules, "4500") {
		t.Errorf("gw1 still maps port 4500 after btmmd stopped (%v):\n%s", err, rules)
	}
	for _, o := range hosts[1:] {
		testenv.WaitFor(t, o.name+" sees host1 leave", 30*time.Second, func() error {
			st, err := o.status(t, bins)
			if err != nil {
				return err
			}
			for _, p := range st.Peers {
				if p.Name == "host1" {
					return fmt.Errorf("still lists host1: %+v", p)
				}
			}
			return nil
		})
	}
	out, _ = hosts[1].ns.Run(filepath.Join(bins, "btmmctl"), "-socket", hosts[1].sock, "peers")
	show(t, "btmmctl peers   # on host2, after host1 stopped: its records were deleted, the LLQ pushed the removal", out)
	testenv.WaitFor(t, "btmmctl watch on host2 reports host1 gone", 10*time.Second, func() error {
		if !strings.Contains(watch.String(), `"type":"peer_removed","peer":"host1"`) {
			return fmt.Errorf("watch printed:\n%s", watch.String())
		}
		return nil
	})
	show(t, "btmmctl watch --json   # on host2, while host1 stopped", watch.String())
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

var rtSeq atomic.Int64 // tests run in parallel

// roundTrip sends a numbered line and expects it back within 10 s (TCP
// retransmits across a brief gap; a reset or a timeout fails the test).
func roundTrip(t *testing.T, c net.Conn, when string) {
	t.Helper()
	roundTripWithin(t, c, when, 10*time.Second)
}

// roundTripWithin is roundTrip with another deadline (TCP's retransmission
// timer has backed off after a long outage).
func roundTripWithin(t *testing.T, c net.Conn, when string, d time.Duration) {
	t.Helper()
	msg := fmt.Sprintf("ping %d\n", rtSeq.Add(1))
	c.SetDeadline(time.Now().Add(d))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("TCP between ULAs broke %s: %v", when, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("TCP between ULAs broke %s: %q, %v", when, buf, err)
	}
}
