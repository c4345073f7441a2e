package installtest

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/names"
	"github.com/btmm/btmm/internal/testenv"
)

// ctlNames is `btmmctl status --json`'s names object.
func ctlNames(t *testing.T) (n struct{ Mechanism, Detail, Why, Error string }) {
	t.Helper()
	var st struct {
		Names *struct {
			Mechanism string `json:"mechanism"`
			Detail    string `json:"detail"`
			Why       string `json:"why"`
			Error     string `json:"error"`
		} `json:"names"`
	}
	out := sh(t, "btmmctl", "status", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Names == nil {
		t.Fatalf("btmmctl status --json has no names: %v\n%s", err, out)
	}
	return struct{ Mechanism, Detail, Why, Error string }{st.Names.Mechanism, st.Names.Detail, st.Names.Why, st.Names.Error}
}

// startResolved sets systemd-resolved up as its Debian package's postinst
// would (/etc/resolv.conf to its stub) with the zone's server as the global
// DNS server, and starts it. Only in the VM guest: hack/vmexec puts the
// package into the guest's tree, and everything written here stays in the
// guest's memory.
func startResolved(t *testing.T) {
	t.Helper()
	if os.Getenv("BTMM_IN_VM") != "1" {
		t.Fatal("systemd-resolved is set up only in the VM guest (this rewrites /etc/resolv.conf): run with hack/vmexec, BTMM_VM_INIT=systemd")
	}
	if out, _ := run("systemctl", "is-active", "systemd-resolved"); strings.TrimSpace(out) == "active" {
		return
	}
	writeFile(t, "/etc/systemd/resolved.conf.d/btmm-test.conf", "[Resolve]\nDNS="+serverIP+"\nDNSSEC=no\nLLMNR=no\nMulticastDNS=no\n", 0o644)
	os.Remove("/etc/resolv.conf")
	if err := os.Symlink("../run/systemd/resolve/stub-resolv.conf", "/etc/resolv.conf"); err != nil {
		t.Fatal(err)
	}
	sh(t, "systemctl", "start", "systemd-resolved")
}

var spaces = regexp.MustCompile(`\s+`)

// namesThroughResolved: with btmmd running (names.mode auto, the hosts
// block in place), systemd-resolved starts; btmmd moves the names to a
// per-link DNS route to its stub, drops the hosts block, and the peer
// resolves through resolved (D-Bus, its stub at 127.0.0.53, glibc), short
// name included; other names resolve as before.
func namesThroughResolved(t *testing.T, peerULA, laptopULA string) {
	t.Helper()
	dom := strings.TrimSuffix(domain, ".")
	soaBefore := strings.TrimSpace(sh(t, "dig", "+short", "@"+serverIP, zone, "SOA"))
	srvBefore := strings.TrimSpace(sh(t, "dig", "+short", "@"+serverIP, "_dns-update._udp."+domain, "SRV"))
	if soaBefore == "" || srvBefore == "" {
		t.Fatalf("the zone's server answers no SOA (%q) or update SRV (%q)", soaBefore, srvBefore)
	}
	startResolved(t)
	testenv.WaitFor(t, "btmmd routes the domain through systemd-resolved", 45*time.Second, func() error {
		if n := ctlNames(t); n.Mechanism != "resolved" || n.Error != "" {
			return fmt.Errorf("names %+v", n)
		}
		return nil
	})
	if b, err := os.ReadFile("/etc/hosts"); err != nil || strings.Contains(string(b), "btmm laptop.") {
		t.Fatalf("with the resolved route, /etc/hosts still has btmmd's block (%v):\n%s", err, b)
	}
	link := sh(t, "resolvectl", "status", "btmm0")
	flat := spaces.ReplaceAllString(link, " ")
	for _, want := range []string{"Link ", "(btmm0)", "Current Scopes: DNS", "-DefaultRoute", "DNS Servers: 127.0.0.77", "DNS Domain: " + dom} {
		if !strings.Contains(flat, want) {
			t.Fatalf("resolvectl status btmm0 lacks %q:\n%s", want, link)
		}
	}
	if out := sh(t, "resolvectl", "query", "desk."+dom); !strings.Contains(out, peerULA) || !strings.Contains(out, "link: btmm0") {
		t.Fatalf("resolvectl query desk.%s:\n%s", dom, out)
	}
	for _, n := range []string{"desk." + dom, "desk", "laptop." + dom} {
		want := peerULA
		if strings.HasPrefix(n, "laptop") {
			want = laptopULA
		}
		if out, err := run("getent", "ahostsv6", n); err != nil || !strings.HasPrefix(out, want+" ") {
			t.Fatalf("getent ahostsv6 %s (glibc -> 127.0.0.53 -> resolved -> btmmd's stub): %v\n%s", n, err, out)
		}
	}
	if out := sh(t, "dig", "+short", "@127.0.0.53", "desk."+domain, "AAAA"); strings.TrimSpace(out) != peerULA {
		t.Fatalf("resolved's stub answers %q for desk, want %s", out, peerULA)
	}
	if out, err := run("ping", "-c", "1", "-W", "5", "desk"); err != nil || !strings.Contains(out, peerULA) {
		t.Fatalf("ping desk through resolved: %v\n%s", err, out)
	}
	// Other names as before: the zone's SOA through resolved's global
	// server; SRV discovery in the user's domain reaches the zone's server
	// through btmmd's stub; /etc/hosts names.
	if out := strings.TrimSpace(sh(t, "dig", "+short", "@127.0.0.53", zone, "SOA")); out != soaBefore {
		t.Errorf("the zone's SOA through resolved: %q, before %q", out, soaBefore)
	}
	if out := strings.TrimSpace(sh(t, "dig", "+short", "@127.0.0.53", "_dns-update._udp."+domain, "SRV")); out != srvBefore {
		t.Errorf("the update SRV through resolved: %q, from the server %q", out, srvBefore)
	}
	if out, err := run("getent", "hosts", "localhost"); err != nil || strings.TrimSpace(out) == "" {
		t.Errorf("localhost no longer resolves: %v %s", err, out)
	}
	if out := sh(t, "btmmctl", "status"); !strings.Contains(out, "names      resolved: systemd-resolved, link btmm0: DNS 127.0.0.77:53, domain "+dom+", not default route") {
		t.Errorf("btmmctl status does not show the resolved route:\n%s", out)
	}
}

// TestResolvedLinkAPI: names.Resolved against the real systemd-resolved
// on a link that stays: SetLink is what resolved reports back (routing-only
// domain, DNS with its port, not default route), RevertLink removes it.
func TestResolvedLinkAPI(t *testing.T) {
	testenv.RequireSystemd(t)
	startResolved(t)
	sh(t, "ip", "link", "add", "vres0", "type", "veth", "peer", "name", "vres1")
	t.Cleanup(func() { run("ip", "link", "del", "vres0") })
	sh(t, "ip", "addr", "add", "10.78.0.1/24", "dev", "vres0")
	sh(t, "ip", "link", "set", "vres1", "up")
	sh(t, "ip", "link", "set", "vres0", "up")
	ifi, err := net.InterfaceByName("vres0")
	if err != nil {
		t.Fatal(err)
	}
	r, err := names.DialResolved()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if owner, err := r.Owner(); err != nil || owner == "" {
		t.Fatalf("org.freedesktop.resolve1 owner %q: %v", owner, err)
	}
	server := netip.MustParseAddrPort("10.78.0.1:5353")
	if err := r.SetLink(ifi.Index, server, names.Domains("bob.btmm.example.", false)); err != nil {
		t.Fatal(err)
	}
	ls, err := r.Link(ifi.Index)
	if err != nil {
		t.Fatal(err)
	}
	if len(ls.DNS) != 1 || ls.DNS[0] != server || len(ls.Domains) != 1 || ls.Domains[0].String() != "~bob.btmm.example" || ls.DefaultRoute {
		t.Fatalf("resolved has for vres0: %+v", ls)
	}
	if out := spaces.ReplaceAllString(sh(t, "resolvectl", "status", "vres0"), " "); !strings.Contains(out, "DNS Domain: ~bob.btmm.example") ||
		!strings.Contains(out, "10.78.0.1:5353") {
		t.Fatalf("resolvectl status vres0: %s", out)
	}
	if err := r.RevertLink(ifi.Index); err != nil {
		t.Fatal(err)
	}
	if ls, err := r.Link(ifi.Index); err != nil || len(ls.DNS)+len(ls.Domains) != 0 {
		t.Fatalf("after RevertLink: %+v %v", ls, err)
	}
	if out := sh(t, "resolvectl", "status", "vres0"); strings.Contains(out, "bob.btmm.example") {
		t.Fatalf("after RevertLink, resolvectl status vres0:\n%s", out)
	}
}
