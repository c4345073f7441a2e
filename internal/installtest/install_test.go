package installtest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

const (
	zone     = "btmm.example."
	domain   = "alice.btmm.example."
	serverIP = "10.77.0.1" // the root namespace: btmm-dnsd and btmmd under systemd
	peerIP   = "10.77.0.2" // netns "peer": a second btmmd started by the test
)

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := run(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

// debs returns the two packages `make deb` built into BTMM_BIN_DIR.
func debs(t *testing.T) (btmm, dnsd, bins string) {
	t.Helper()
	bins = os.Getenv("BTMM_BIN_DIR")
	if bins == "" {
		t.Fatal("BTMM_BIN_DIR is not set: run this test with `make test-vm` (it builds the packages with `make deb`)")
	}
	find := func(pattern string) string {
		m, _ := filepath.Glob(filepath.Join(bins, pattern))
		if len(m) != 1 {
			t.Fatalf("want one %s in %s (make deb), found %v", pattern, bins, m)
		}
		return m[0]
	}
	return find("btmm_*.deb"), find("btmm-dnsd_*.deb"), bins
}

// status is btmmd's own status type, over its control socket (btmmctl
// --json prints the documented schema, checked on its own below).
func status(sock string) (*agent.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return agent.FetchStatus(ctx, sock)
}

func journal(unit string) string {
	out, _ := run("journalctl", "-b", "--no-pager", "-o", "cat", "-u", unit)
	return out
}

// TestInstallAndLiveWithIt installs the packages, runs both daemons under
// systemd and checks start, readiness, reload and a stop that leaves
// nothing behind.
func TestInstallAndLiveWithIt(t *testing.T) {
	testenv.RequireSystemd(t)
	testenv.RequireNetNS(t)
	btmmDeb, dnsdDeb, _ := debs(t)
	t.Cleanup(func() {
		if t.Failed() {
			for _, u := range []string{"btmm-dnsd", "btmmd"} {
				t.Logf("--- journal of %s ---\n%s", u, journal(u))
			}
		}
	})

	// Install.
	sh(t, "dpkg", "-i", dnsdDeb, btmmDeb)
	for _, f := range []string{"/usr/sbin/btmmd", "/usr/bin/btmmctl", "/usr/sbin/btmm-dnsd", "/lib/systemd/system/btmmd.service",
		"/lib/systemd/system/btmm-dnsd.service", "/etc/btmm/btmmd.toml.sample", "/etc/btmm/dnsd.toml.sample",
		"/usr/lib/tmpfiles.d/btmmd.conf", "/usr/share/bash-completion/completions/btmmctl"} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("the packages did not install %s: %v", f, err)
		}
	}
	if st, err := os.Stat("/run/btmm"); err != nil || !st.IsDir() {
		t.Errorf("postinst did not create /run/btmm (tmpfiles): %v", err)
	}
	if out, err := run("systemd-analyze", "verify", "btmmd.service", "btmm-dnsd.service"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("systemd-analyze verify is not clean: %v\n%s", err, out)
	}
	// Not started before it is configured.
	if out, _ := run("systemctl", "is-active", "btmmd"); strings.TrimSpace(out) == "active" {
		t.Fatal("btmmd runs before it was configured")
	}

	// The network: the root namespace (this "server + laptop") and a peer.
	peer := netns.New(t, "peer")
	sh(t, "ip", "link", "add", "vroot", "type", "veth", "peer", "name", "vpeer", "netns", peer.Name)
	t.Cleanup(func() { run("ip", "link", "del", "vroot") })
	sh(t, "ip", "addr", "add", serverIP+"/24", "dev", "vroot")
	sh(t, "ip", "link", "set", "vroot", "up")
	peer.MustAddr(t, "vpeer", peerIP+"/24")
	peer.MustRun(t, "ip", "link", "set", "vpeer", "up")

	// The rendezvous server, under systemd.
	writeFile(t, "/etc/btmm/dnsd.toml", fmt.Sprintf("zone = %q\nserver_addrs = [%q]\ndata_dir = \"/var/lib/btmm-dnsd\"\nlisten = \"%s:53\"\nlisten_tls = \"\"\nmetrics_listen = \"127.0.0.1:9478\"\n", zone, serverIP, serverIP), 0o644)
	sh(t, "systemctl", "start", "btmm-dnsd")
	keyText := sh(t, "btmm-dnsd", "adduser", "alice")
	writeFile(t, "/root/alice.key", keyText, 0o600) // desk uses alice's user key

	// A PSK shared by alice's hosts (no KDC in this test; TestEnrollKerberos
	// covers the keytab path).
	writeFile(t, "/root/alice.psk", strings.Repeat("0123456789abcdef", 3), 0o600)

	// Enrollment: the server prints laptop's bundle, laptop installs it.
	bundle := sh(t, "btmm-dnsd", "enroll", "-psk-file", "/root/alice.psk", "alice", "laptop")
	writeFile(t, "/root/laptop.bundle", bundle, 0o600)
	sh(t, "btmmctl", "enroll", "/root/laptop.bundle")
	for f, mode := range map[string]os.FileMode{"/etc/btmm/btmm.key": 0o600, "/etc/btmm/psk": 0o600, "/etc/btmm/btmmd.toml": 0o644} {
		if st, err := os.Stat(f); err != nil || st.Mode().Perm() != mode {
			t.Fatalf("btmmctl enroll wrote %s: %v, mode %v, want %04o", f, err, st.Mode(), mode)
		}
	}
	enrolled, err := os.ReadFile("/etc/btmm/btmmd.toml")
	if err != nil {
		t.Fatal(err)
	}
	// This test's network has no NAT gateway: the public address is static.
	laptopConf := string(enrolled) + fmt.Sprintf("\n[nat]\nmode = \"off\"\nexternal = \"%s:4500\"\n\n[metrics]\nlisten = \"127.0.0.1:9477\"\n", serverIP)
	writeFile(t, "/etc/btmm/btmmd.toml", laptopConf, 0o644)

	conf := func(host, ip, sock, state string) string {
		return fmt.Sprintf(`host = %q
domain = %q
control_socket = %q
state_file = %q
[dns]
key_file = "/root/alice.key"
server = "%s:53"
[nat]
mode = "off"
external = "%s:4500"
[keying]
mode = "psk"
psk_file = "/root/alice.psk"
[names]
mode = "off"   # desk shares this machine's files: /etc/hosts and names are laptop's
`, host, domain, sock, state, serverIP, ip)
	}

	// systemctl start returns once btmmd said READY=1: it is registered.
	start := time.Now()
	sh(t, "systemctl", "start", "btmmd")
	t.Logf("systemctl start btmmd took %v", time.Since(start).Round(time.Millisecond))
	if out := sh(t, "systemctl", "is-active", "btmmd"); strings.TrimSpace(out) != "active" {
		t.Fatalf("btmmd after start: %s", out)
	}
	st, err := status("/run/btmm/btmmd.sock")
	if err != nil || !st.Register.Published {
		t.Fatalf("btmmd is active but not registered (READY=1 too early): %v %+v", err, st)
	}
	statusText := sh(t, "systemctl", "show", "-p", "StatusText", "--value", "btmmd")
	if !strings.Contains(statusText, "registered on "+serverIP+":53") || !strings.Contains(statusText, "LLQ up") {
		t.Errorf("btmmd's STATUS= is %q", statusText)
	}
	laptopULA := st.ULA

	// The peer: the same agent, started by hand in its namespace.
	peerDir := t.TempDir()
	writeFile(t, peerDir+"/btmmd.toml", conf("desk", peerIP, peerDir+"/btmmd.sock", peerDir+"/identity.json"), 0o644)
	var peerLog testenv.SyncBuffer
	pc := peer.Command(context.Background(), "/usr/sbin/btmmd", "-config", peerDir+"/btmmd.toml")
	pc.Stdout, pc.Stderr = &peerLog, &peerLog
	if err := peer.StartCmd(pc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- desk's btmmd ---\n%s", peerLog.String())
		}
	})
	var peerULA string
	testenv.WaitFor(t, "laptop and desk keyed with each other", 2*time.Minute, func() error {
		for _, sock := range []string{"/run/btmm/btmmd.sock", peerDir + "/btmmd.sock"} {
			st, err := status(sock)
			if err != nil {
				return err
			}
			if sock != "/run/btmm/btmmd.sock" {
				peerULA = st.ULA.String()
			}
			if len(st.Peers) != 1 || !st.Peers[0].Keyed || !st.Peers[0].InKernel {
				return fmt.Errorf("%s: peers %+v", st.Host, st.Peers)
			}
		}
		return nil
	})
	if out, err := run("ping", "-6", "-c", "2", "-W", "5", peerULA); err != nil {
		t.Fatalf("ping laptop -> desk ULA %s: %v\n%s", peerULA, err, out)
	}
	// btmmctl ping: through the tunnel, with the path; peers are healthy.
	// Both hosts sit on one link (10.77.0.0/24) and [paths] is on by
	// default: the path checks choose the LAN candidate.
	if out, err := run("btmmctl", "ping", "-c", "2", "-i", "0.2", "desk"); err != nil || !strings.Contains(out, "pong from desk ("+peerULA+")") ||
		!strings.Contains(out, "via lan ") || strings.Contains(out, "did not move") {
		t.Fatalf("btmmctl ping desk: %v\n%s", err, out)
	}
	var peers struct {
		Peers []struct {
			Name   string `json:"name"`
			Health struct {
				State string `json:"state"`
			} `json:"health"`
		} `json:"peers"`
	}
	if out, err := run("btmmctl", "peers", "--json"); err != nil || json.Unmarshal([]byte(out), &peers) != nil ||
		len(peers.Peers) != 1 || peers.Peers[0].Name != "desk" || peers.Peers[0].Health.State != "ok" {
		t.Fatalf("btmmctl peers --json: %v\n%s", err, out)
	}

	// Names: the peer by its short and full name (hosts block), the stub,
	// and other names as before.
	testenv.WaitFor(t, "desk resolves to its ULA", 30*time.Second, func() error {
		for _, n := range []string{"desk", "desk." + strings.TrimSuffix(domain, "."), "laptop"} {
			out, err := run("getent", "ahostsv6", n)
			if err != nil {
				return err
			}
			want := peerULA
			if n == "laptop" {
				want = laptopULA.String()
			}
			if !strings.HasPrefix(out, want+" ") {
				return fmt.Errorf("getent ahostsv6 %s: %s", n, out)
			}
		}
		return nil
	})
	for _, n := range []string{"desk", "desk." + strings.TrimSuffix(domain, ".")} {
		if out, err := run("ping", "-c", "1", "-W", "5", n); err != nil || !strings.Contains(out, peerULA) {
			t.Fatalf("ping %s: %v\n%s", n, err, out)
		}
	}
	if out := sh(t, "dig", "+short", "@127.0.0.77", "desk."+domain, "AAAA"); strings.TrimSpace(out) != peerULA {
		t.Fatalf("the name stub answers %q for desk, want %s", out, peerULA)
	}
	if out, err := run("getent", "hosts", "localhost"); err != nil || strings.TrimSpace(out) == "" {
		t.Fatalf("localhost no longer resolves: %v %s", err, out)
	}

	// names.mode auto without systemd-resolved running: the hosts block
	// (checked above), and btmmctl status says so and why.
	if n := ctlNames(t); n.Mechanism != "hosts" || n.Why != "systemd-resolved is not running" {
		t.Fatalf("btmmctl status --json names (resolved not running): %+v", n)
	}
	if out := sh(t, "btmmctl", "status"); !strings.Contains(out, "names      hosts: block in /etc/hosts; stub 127.0.0.77:53 (systemd-resolved is not running)") {
		t.Errorf("btmmctl status does not show the names mechanism:\n%s", out)
	}
	// Once resolved runs, a per-link DNS route to the stub instead.
	namesThroughResolved(t, peerULA, laptopULA.String())

	// Metrics: both daemons answer on their configured local addresses.
	for _, m := range []struct{ url, want string }{
		{"http://127.0.0.1:9477/metrics", `btmm_peer_packets_total{direction="tx",peer="desk"}`},
		{"http://127.0.0.1:9477/metrics", "btmm_registration_published 1"},
		{"http://127.0.0.1:9477/metrics", `btmm_llq_questions{state="llq"}`},
		{"http://127.0.0.1:9477/metrics", `btmm_peer_health{peer="desk",state="ok"} 1`},
		{"http://127.0.0.1:9477/metrics", "btmm_keying_attempts_total "},
		{"http://127.0.0.1:9478/metrics", `btmm_dnsd_updates_total{result="NOERROR"}`},
		{"http://127.0.0.1:9478/metrics", "btmm_dnsd_llqs "},
		{"http://127.0.0.1:9478/metrics", "btmm_dnsd_store_fsync_seconds_count "},
		{"http://127.0.0.1:9478/metrics", "btmm_dnsd_llq_event_seconds_count "},
	} {
		testenv.WaitFor(t, m.url+" shows "+m.want, 20*time.Second, func() error {
			resp, err := http.Get(m.url)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if !strings.Contains(string(b), m.want) || strings.Contains(string(b), "btmm_dnsd_llqs 0\n") {
				return fmt.Errorf("not in:\n%s", grepBTMM(string(b)))
			}
			return nil
		})
	}

	// Reload: a runtime change is applied, a fixed one refused (btmmd
	// keeps running with the old configuration).
	writeFile(t, "/etc/btmm/btmmd.toml", "log_level = \"debug\"\n"+laptopConf, 0o644)
	sh(t, "systemctl", "reload", "btmmd")
	testenv.WaitFor(t, "btmmd logs the reload", 30*time.Second, func() error {
		if !strings.Contains(journal("btmmd"), "reloaded configuration and key files") {
			return fmt.Errorf("not in the journal yet")
		}
		return nil
	})
	writeFile(t, "/etc/btmm/btmmd.toml", laptopConf+"\n[tunnel]\nport = 4501\n", 0o644)
	sh(t, "systemctl", "reload", "btmmd")
	testenv.WaitFor(t, "btmmd refuses the port change", 30*time.Second, func() error {
		if !strings.Contains(journal("btmmd"), "tunnel.port cannot change while btmmd runs") {
			return fmt.Errorf("not in the journal yet")
		}
		return nil
	})
	if out := sh(t, "systemctl", "is-active", "btmmd"); strings.TrimSpace(out) != "active" {
		t.Fatalf("btmmd after a refused reload: %s", out)
	}
	if st, err := status("/run/btmm/btmmd.sock"); err != nil || st.TunnelPort != 4500 || st.ULA != laptopULA {
		t.Fatalf("after a refused reload: %v %+v", err, st)
	}

	// Stop: nothing of btmmd's is left.
	sh(t, "systemctl", "stop", "btmmd")
	for _, what := range [][]string{{"ip", "xfrm", "state"}, {"ip", "xfrm", "policy"}, {"ip", "-6", "route", "show", "proto", "98"}} {
		if out := sh(t, what[0], what[1:]...); strings.TrimSpace(out) != "" {
			t.Errorf("after systemctl stop, `%s` shows:\n%s", strings.Join(what, " "), out)
		}
	}
	if out := sh(t, "ip", "-6", "addr", "show", "dev", "lo"); strings.Contains(out, laptopULA.String()) {
		t.Errorf("after systemctl stop, lo still has the ULA %s:\n%s", laptopULA, out)
	}
	for _, f := range []string{"/run/btmm/btmmd.sock", "/run/btmm/btmmd.pid"} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("after systemctl stop, %s is still there (%v)", f, err)
		}
	}
	if b, err := os.ReadFile("/etc/hosts"); err != nil || strings.Contains(string(b), "btmm laptop.") {
		t.Errorf("after systemctl stop, /etc/hosts still has btmmd's block (%v):\n%s", err, b)
	}
	if out, err := run("dig", "+short", "+time=2", "+tries=1", "@127.0.0.77", "desk."+domain, "AAAA"); err == nil {
		t.Errorf("after systemctl stop, the name stub still answers: %s", out)
	}
	// resolved: no route to the stub is left, the stub's address is gone
	// from btmm's link, and the domain no longer resolves.
	if out := sh(t, "resolvectl", "status"); strings.Contains(out, strings.TrimSuffix(domain, ".")) || strings.Contains(out, "127.0.0.77") {
		t.Errorf("after systemctl stop, resolvectl status still shows btmmd's route:\n%s", out)
	}
	if out := sh(t, "ip", "-4", "addr"); strings.Contains(out, "127.0.0.77") {
		t.Errorf("after systemctl stop, the stub's address is still on a link:\n%s", out)
	}
	if out, err := run("resolvectl", "query", "desk."+domain); err == nil {
		t.Errorf("after systemctl stop, desk still resolves through systemd-resolved: %s", out)
	}
	if out := sh(t, "dig", "+short", "@"+serverIP, "laptop."+domain, "AAAA"); strings.TrimSpace(out) != "" {
		t.Errorf("after systemctl stop, the server still has laptop's AAAA: %s", out)
	}
	for _, l := range strings.Split(journal("btmmd"), "\n") {
		if strings.Contains(l, "level=ERROR") && !strings.Contains(l, "reload refused") {
			t.Errorf("btmmd logged an error: %s", l)
		}
	}
}

func grepBTMM(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "btmm_") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
