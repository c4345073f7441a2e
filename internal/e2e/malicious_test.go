package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/miniupnpd"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// TestMaliciousHost is issue 13's "malicious host": a third host of alice,
// mallory (on the lab's public host), with its own valid btmm-dnsd host key
// and Kerberos keytab, runs btmmd like the others and then, with its own
// key, publishes (a) host2's ULA under its own name, (b) its own ULA under
// host2's name, (c) a TXT naming host2's principal. btmm-dnsd refuses (a)
// and (b); (c) is its own record, which the peers' keying ignores (they
// key with mallory as host/mallory, derived from its name, also after host1
// starts afresh); (a) is refused even with alice's user key. All along, a
// capture on mallory's interface shows no ESP of the host1-host2 SAs, and
// host1 and host2 reach each other. Finally `btmm-dnsd delhost alice
// mallory` cuts mallory off: host1 and host2 drop its SAs at once and do not
// key with it again, though its btmmd and keytab are still there.
func TestMaliciousHost(t *testing.T) {
	testenv.Require(t, testenv.ESP)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	nsupdate := testenv.RequireBinary(t, "nsupdate", "bind9-dnsutils")
	tcpdump := testenv.RequireBinary(t, "tcpdump", "tcpdump")
	t.Parallel() // its own lab (startAlice); overlaps the other e2e labs (the VM tier runs them two at a time)
	al := startAlice(t, "mallory", "")
	l, bins, dir, hosts := al.l, al.bins, al.dir, al.hosts
	h1, h2, mal := hosts[0], hosts[1], hosts[2]
	sts := al.sts
	allKeyed := al.allKeyed
	allKeyed(2) // mallory is a genuine host of alice: keyed as itself
	ulaOf := func(h *host) netip.Addr { return sts[h.name].ULA }
	spis := pairSPIs(t, l)

	// Capture everything on mallory's interface from here on.
	capCtx, stopCapture := context.WithCancel(context.Background())
	defer stopCapture()
	capture := l.Pub.Command(capCtx, tcpdump, "-n", "-l", "-i", "eth0", "udp", "port", "4500")
	var captured strings.Builder
	capOut, err := capture.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	capture.Stderr = nil
	if err := capture.Start(); err != nil {
		t.Fatal(err)
	}
	capDone := make(chan struct{})
	go func() {
		defer close(capDone)
		buf := make([]byte, 4096)
		for {
			n, err := capOut.Read(buf)
			captured.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	time.Sleep(time.Second)
	// mallory's own tunnels carry traffic (so the capture shows ESP), and so
	// does host1-host2's (which must not show up there).
	pingAll := func(when string) {
		for _, pair := range [][2]*host{{h1, mal}, {h2, mal}, {h1, h2}, {h2, h1}} {
			// -w, not -W: see TestDelprincCutsHostOffE2E's ping.
			res, err := pair[0].ns.Run("ping", "-6", "-c", "2", "-i", "0.3", "-w", "10", ulaOf(pair[1]).String())
			if err != nil || !strings.Contains(res, " 0% packet loss") {
				t.Fatalf("%s: ping %s -> %s: %v\n%s", when, pair[0].name, pair[1].name, err, res)
			}
		}
	}
	pingAll("before the attacks")

	d := "." + domain
	run := func(keyFile, script string) (string, error) {
		cmd := l.Pub.Command(context.Background(), nsupdate, "-k", keyFile, "-t", "5")
		cmd.Stdin = strings.NewReader(fmt.Sprintf("server %s 53\nzone %s\n%ssend\n", lab.InetAddr, domain, script))
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	malKey := filepath.Join(dir, "mallory.key")
	for _, tc := range []struct{ name, script string }{
		{"(a) host2's ULA under mallory's name", fmt.Sprintf("update add mallory%s 60 AAAA %s\n", d, ulaOf(h2))},
		{"(b) mallory's ULA under host2's name", fmt.Sprintf("update add host2%s 60 AAAA %s\n", d, ulaOf(mal))},
		{"(b) host2's ULA deleted", fmt.Sprintf("update delete host2%s AAAA\n", d)},
	} {
		out, err := run(malKey, tc.script)
		if err == nil || !strings.Contains(out, "REFUSED") {
			t.Fatalf("%s with mallory's key: want REFUSED by btmm-dnsd, got %v\n%s", tc.name, err, out)
		}
		t.Logf("%s: REFUSED by btmm-dnsd", tc.name)
	}
	// (c): mallory's own TXT, naming host2's principal.
	krb := "host/host2" + strings.TrimSuffix(d, ".")
	out, err := run(malKey, fmt.Sprintf("update delete _autotunnel._udp.mallory%s TXT\nupdate add _autotunnel._udp.mallory%s 60 TXT \"v=1\" \"krb=%s\"\n", d, d, krb))
	if err != nil {
		t.Fatalf("(c) mallory's own TXT: %v\n%s", err, out)
	}
	// host1 starts again and keys everybody afresh, with mallory's TXT
	// in DNS: were krb= used, host1 would ask mallory to show host2's
	// principal, which mallory's keytab cannot.
	h1.d.cmd.Process.Signal(syscall.SIGTERM)
	h1.d.cmd.Wait()
	h1.d = start(t, h1.ns, "btmmd host1 (again)", filepath.Join(bins, "btmmd"), "-config", filepath.Join(dir, "host1.toml"))
	allKeyed(2)
	t.Logf("(c) TXT krb=%s on mallory's name: ignored, host1 keyed with mallory as host/mallory again", krb)

	// Not even alice's user key (which may change the whole domain) can
	// make two names hold one ULA: btmm-dnsd refuses it for every key. (What
	// the peers do if a server let it through — key with neither name and
	// show the conflict — is controlplane/agent's TestULAConflictInStatus.)
	userKey := filepath.Join(dir, "alice.key")
	if out, err := run(userKey, fmt.Sprintf("update add mallory%s 60 AAAA %s\n", d, ulaOf(h2))); err == nil || !strings.Contains(out, "REFUSED") {
		t.Fatalf("(a) with alice's user key: want REFUSED, got %v\n%s", err, out)
	}
	allKeyed(2)

	spis = append(spis, pairSPIs(t, l)...)
	pingAll("after the attacks")
	stopCapture()
	capture.Wait()
	<-capDone
	text := captured.String()
	var leaked []string
	for _, spi := range spis {
		if strings.Contains(text, "spi="+spi+",") {
			leaked = append(leaked, spi)
		}
	}
	if len(leaked) > 0 {
		t.Fatalf("ESP of the host1-host2 SAs %v reached mallory:\n%s", leaked, text)
	}
	if !strings.Contains(text, "ESP(") {
		t.Fatalf("the capture on mallory's eth0 holds no ESP at all (not even mallory's own): it did not work\n%s", text)
	}
	// delhost: btmm-dnsd removes mallory's key and records at once; the
	// others drop mallory's SAs (LLQ removal) and refuse its INITs (its
	// ULA is nobody's now), though its btmmd and keytab are still there.
	dout, err := exec.Command(filepath.Join(bins, "btmm-dnsd"), "-config", filepath.Join(dir, "dnsd.toml"), "delhost", "alice", "mallory").CombinedOutput()
	if err != nil {
		t.Fatalf("btmm-dnsd delhost alice mallory: %v\n%s", err, dout)
	}
	cut := time.Now()
	for _, h := range []*host{h1, h2} {
		testenv.WaitFor(t, h.name+" drops mallory after delhost", 60*time.Second, func() error {
			st, err := h.status(t, bins)
			if err != nil {
				return err
			}
			for _, p := range st.Peers {
				if p.Name == "mallory" || p.ULA == ulaOf(mal) {
					return fmt.Errorf("still lists mallory: %+v", p)
				}
			}
			if xs, _ := h.ns.Run("ip", "xfrm", "state"); strings.Contains(xs, lab.PubAddr) {
				return fmt.Errorf("still has SAs with mallory's address:\n%s", xs)
			}
			return nil
		})
	}
	t.Logf("delhost: host1 and host2 cut mallory off %v after the command", time.Since(cut).Round(100*time.Millisecond))
	time.Sleep(5 * time.Second) // mallory's btmmd keeps trying
	for _, h := range []*host{h1, h2} {
		if xs, _ := h.ns.Run("ip", "xfrm", "state"); strings.Contains(xs, lab.PubAddr) {
			t.Errorf("%s keyed with mallory again after delhost:\n%s", h.name, xs)
		}
	}
	if res, err := l.Host1.Run("ping", "-6", "-c", "3", "-i", "0.3", "-w", "10", ulaOf(h2).String()); err != nil || !strings.Contains(res, " 0% packet loss") {
		t.Fatalf("host1 -> host2 after delhost of mallory: %v\n%s", err, res)
	}

	var sample []string
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, "ESP(") && len(sample) < 3 {
			sample = append(sample, line)
		}
	}
	t.Logf("capture on mallory's eth0: %d ESP packets (mallory's own pairs), none of the %d host1-host2 SAs %v; e.g.\n%s",
		strings.Count(text, "ESP("), len(spis), spis, strings.Join(sample, "\n"))
}

// alice is three hosts of alice in the lab, each with its own btmm-dnsd
// host key and keytab, running btmmd: host1 and host2 behind the two
// miniupnpd NATs, the third (named as asked) on the public host.
type alice struct {
	l         *lab.Lab
	bins, dir string
	kdc       *krbtest.KDC
	hosts     []*host
	sts       map[string]*agent.Status
	t         *testing.T
}

// startAlice starts btmm-dnsd, the KDC, both NATs and the three btmmd;
// keyingExtra is added to each btmmd's [keying] section.
func startAlice(t *testing.T, third, keyingExtra string) *alice {
	t.Helper()
	al := &alice{bins: binaries(t), dir: t.TempDir(), sts: map[string]*agent.Status{}, t: t}
	bins, dir := al.bins, al.dir
	l := lab.New(t)
	al.l = l
	hostKey := rendezvous(t, l, bins, dir)
	kdc := krbtest.StartIn(t, realm, l.Inet, netip.MustParseAddr(lab.InetAddr), 88)
	al.kdc = kdc
	for _, g := range []struct {
		gw  *netns.NS
		lan string
	}{{l.GW1, "192.168.1.0/24"}, {l.GW2, "192.168.2.0/24"}} {
		miniupnpd.StartT(t, g.gw, miniupnpd.Options{WAN: "wan", LAN: "lan", LANNet: netip.MustParsePrefix(g.lan), KeepRuleset: true})
	}
	al.hosts = []*host{{name: "host1", ns: l.Host1, dataplane: "xfrm"}, {name: "host2", ns: l.Host2, dataplane: "xfrm"},
		{name: third, ns: l.Pub, dataplane: "xfrm"}}
	for _, h := range al.hosts {
		principal := "host/" + h.name + "." + strings.TrimSuffix(domain, ".")
		kdc.AddPrincipal(t, principal)
		ktPath, _ := kdc.Keytab(t, h.name+".keytab", principal)
		h.sock = filepath.Join(dir, h.name+".sock")
		conf := writeHostConf(t, hostFiles{name: h.name, dir: dir, sock: h.sock, dnsKey: hostKey(h.name),
			keying: kerberosKeying(ktPath, kdc.Krb5Conf) + "\n" + keyingExtra}, hostConf{dataplane: h.dataplane})
		h.d = start(t, h.ns, "btmmd "+h.name, filepath.Join(bins, "btmmd"), "-config", conf)
	}
	return al
}

// allKeyed waits until every host has want peers keyed and in its kernel.
func (al *alice) allKeyed(want int) {
	t := al.t
	t.Helper()
	began := time.Now()
	for _, h := range al.hosts {
		testenv.WaitFor(t, h.name+" has its peers keyed", 6*time.Minute, func() error { // generous: discovery may fall back to polling (5 min)
			st, err := h.status(t, al.bins)
			if err != nil {
				return err
			}
			n := 0
			for _, p := range st.Peers {
				if p.Keyed && p.InKernel {
					n++
				}
			}
			if n != want {
				return fmt.Errorf("%d peers keyed: %+v", n, st.Peers)
			}
			al.sts[h.name] = st
			return nil
		})
	}
	t.Logf("every host has %d peers keyed and in its kernel after %v", want, time.Since(began).Round(100*time.Millisecond))
}

// pairSPIs returns the SPIs of the SAs between host1 and host2, read from
// both kernels: those whose outer addresses are the other host's NAT.
func pairSPIs(t *testing.T, l *lab.Lab) []string {
	t.Helper()
	var spis []string
	re := regexp.MustCompile(`(?m)^src (\S+) dst (\S+)\n\s+proto esp spi (0x[0-9a-f]+)`)
	for _, side := range []struct {
		ns    *netns.NS
		other string
	}{{l.Host1, lab.GW2WAN}, {l.Host2, lab.GW1WAN}} {
		xs, err := side.ns.Run("ip", "xfrm", "state")
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(xs, -1) {
			if m[1] == side.other || m[2] == side.other {
				spis = append(spis, m[3])
			}
		}
	}
	if len(spis) < 4 {
		t.Fatalf("found %d SAs between host1 and host2, want at least 4", len(spis))
	}
	return spis
}
