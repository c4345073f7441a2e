// Package lab builds btmm's canonical network lab out of Linux network
// namespaces (docs/lab.md): an "internet" router namespace that also hosts the
// rendezvous DNS server and the KDC, two NAT gateways (nftables masquerade,
// with the chains miniupnpd expects) each with one host behind it, and one host
// with a public address. Tests, the demo (hack/demo) and benchmarks use it.
//
//	          inet  (11.0.0.1 on lo: btmm-dnsd, krb5kdc)
//	  11.1.0.1 /        | 11.2.0.1      \ 11.3.0.1
//	  11.1.0.2 gw1    gw2 11.2.0.2      pub 11.3.0.2 (public host)
//	192.168.1.1 |       | 192.168.2.1
//	192.168.1.2 host1  host2 192.168.2.2
//
// and a spare NAT gateway gw3 (WAN 11.6.0.2, LAN 192.168.3.1) with nobody
// behind it, for a host to roam to.
//
// The "public" addresses come from 11.0.0.0/8 because miniupnpd refuses to
// serve from reserved ranges; the traffic never leaves the namespaces.
//
// Each gateway's LAN side is a bridge ("lan") and each host hangs off it by
// a veth whose gateway end is "lan-<host>", so a host can move (Move): its
// veth end goes to the other gateway's bridge or to inet (a public address),
// and the host gets a new address and default route, as a laptop does when
// it changes networks. Offline/Online take its link down and up.
package lab

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane/nldump"
	"github.com/btmm/btmm/internal/netns"
)

// Well-known addresses of the lab.
const (
	InetAddr  = "11.0.0.1" // rendezvous DNS server and KDC, on inet's lo
	GW1WAN    = "11.1.0.2"
	GW2WAN    = "11.2.0.2"
	GW3WAN    = "11.6.0.2"
	PubAddr   = "11.3.0.2"
	GW1LAN    = "192.168.1.1"
	GW2LAN    = "192.168.2.1"
	GW3LAN    = "192.168.3.1"
	Host1Addr = "192.168.1.2"
	Host2Addr = "192.168.2.2"
)

// Roles, in the order Up creates them; a namespace is named <prefix>-<role>.
var Roles = []string{"inet", "gw1", "gw2", "host1", "host2", "pub", "gw3"}

// Lab is a running lab.
type Lab struct {
	Prefix                            string
	Inet, GW1, GW2, Host1, Host2, Pub *netns.NS
	GW3                               *netns.NS // spare NAT gateway, nobody behind it at first

	mu    sync.Mutex
	where map[*netns.NS]Place // host1/host2's place; missing: where Up put it
}

// All returns the namespaces in Roles order.
func (l *Lab) All() []*netns.NS {
	return []*netns.NS{l.Inet, l.GW1, l.GW2, l.Host1, l.Host2, l.Pub, l.GW3}
}

// Up builds the lab with namespaces named <prefix>-<role>. On error whatever
// was made is removed again.
func Up(prefix string) (_ *Lab, err error) {
	l := &Lab{Prefix: prefix}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	slots := []**netns.NS{&l.Inet, &l.GW1, &l.GW2, &l.Host1, &l.Host2, &l.Pub, &l.GW3}
	for i, role := range Roles {
		n, err := netns.CreateNamed(prefix + "-" + role)
		if err != nil {
			return nil, err
		}
		*slots[i] = n
	}
	step := func(e error) {
		if e != nil && err == nil {
			err = e
		}
	}
	// inet: the router of the "internet", services on lo.
	step(l.Inet.AddAddr("lo", InetAddr+"/32"))
	step(l.Inet.Sysctl("net.ipv4.ip_forward", "1"))
	for _, w := range []struct {
		peer     *netns.NS
		ifInet   string
		inetCIDR string
		peerIf   string
		peerCIDR string
	}{
		{l.GW1, "gw1", "11.1.0.1/24", "wan", GW1WAN + "/24"},
		{l.GW2, "gw2", "11.2.0.1/24", "wan", GW2WAN + "/24"},
		{l.GW3, "gw3", "11.6.0.1/24", "wan", GW3WAN + "/24"},
		{l.Pub, "pub", "11.3.0.1/24", "eth0", PubAddr + "/24"},
	} {
		step(netns.Veth(l.Inet, w.ifInet, w.peer, w.peerIf))
		step(l.Inet.AddAddr(w.ifInet, w.inetCIDR))
		step(w.peer.AddAddr(w.peerIf, w.peerCIDR))
		step(w.peer.AddRoute("default", strings.TrimSuffix(w.inetCIDR, "/24"), w.peerIf))
	}
	// Gateways (a bridge on the LAN side) and the hosts behind them.
	for _, g := range []struct {
		gw, host          *netns.NS
		lan, hostIP, name string
	}{{l.GW1, l.Host1, GW1LAN, Host1Addr, "host1"}, {l.GW2, l.Host2, GW2LAN, Host2Addr, "host2"}, {l.GW3, nil, GW3LAN, "", ""}} {
		// A fixed MAC: a bridge otherwise takes its lowest port's, and
		// changes it when a host moves in or out, stranding the other
		// hosts' neighbour entries for their gateway.
		mac := "02:00:00:00:0" + g.lan[len("192.168."):len("192.168.")+1] + ":01"
		_, err := g.gw.Run("ip", "link", "add", "lan", "address", mac, "type", "bridge")
		step(err)
		_, err = g.gw.Run("ip", "link", "set", "lan", "up")
		step(err)
		step(g.gw.AddAddr("lan", g.lan+"/24"))
		if g.host != nil {
			step(netns.Veth(g.gw, "lan-"+g.name, g.host, "eth0"))
			_, err = g.gw.Run("ip", "link", "set", "lan-"+g.name, "master", "lan", "up")
			step(err)
			step(g.host.AddAddr("eth0", g.hostIP+"/24"))
			step(g.host.AddRoute("default", g.lan, "eth0"))
		}
		step(g.gw.Sysctl("net.ipv4.ip_forward", "1"))
		// Frames bridged between two hosts on one LAN are not routed: keep
		// them out of the NAT's filter (kernels with br_netfilter send
		// them through it; without it the knob does not exist).
		if err := g.gw.Sysctl("net.bridge.bridge-nf-call-iptables", "0"); err != nil && !errors.Is(err, os.ErrNotExist) {
			step(err)
		}
		step(loadNAT(g.gw, strings.TrimSuffix(g.lan, ".1")+".0/24"))
	}
	if err != nil {
		return nil, fmt.Errorf("lab %s: %w", prefix, err)
	}
	return l, nil
}

// natRuleset is a NAT gateway with the chains miniupnpd 2.3 (nftables)
// expects to find (REAL-PEERS.md): forward policy drop with a jump to the
// miniupnpd chain, prerouting/postrouting hooks into its NAT chains, then
// masquerade on the WAN side.
const natRuleset = `
table inet filter {
	chain forward {
		type filter hook forward priority 0; policy drop;
		ct state established,related accept
		iifname "lan" oifname "wan" accept
		jump miniupnpd
	}
	chain miniupnpd { }
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		jump prerouting_miniupnpd
	}
	chain prerouting_miniupnpd { }
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		jump postrouting_miniupnpd
		oifname "wan" ip saddr %s masquerade
	}
	chain postrouting_miniupnpd { }
}
`

func loadNAT(gw *netns.NS, lanCIDR string) error {
	f, err := os.CreateTemp("", "btmm-nft-*.conf")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	fmt.Fprintf(f, natRuleset, lanCIDR)
	f.Close()
	_, err = gw.Run("nft", "-f", f.Name())
	return err
}

// Attach opens a lab that Up (possibly in another process) made.
func Attach(prefix string) (*Lab, error) {
	l := &Lab{Prefix: prefix}
	slots := []**netns.NS{&l.Inet, &l.GW1, &l.GW2, &l.Host1, &l.Host2, &l.Pub, &l.GW3}
	for i, role := range Roles {
		n, err := netns.Open(prefix + "-" + role)
		if err != nil {
			l.Close()
			return nil, err
		}
		*slots[i] = n
	}
	return l, nil
}

// Close removes every namespace of the lab (and the processes in them).
func (l *Lab) Close() error {
	var errs []error
	for _, n := range l.All() {
		if n != nil {
			errs = append(errs, n.Close())
		}
	}
	return errors.Join(errs...)
}

var seq atomic.Int32

// New builds a lab for a test, with a unique prefix that netns.Sweep
// recognises, and removes it when the test ends.
func New(t testing.TB) *Lab {
	t.Helper()
	l, err := Up(fmt.Sprintf("btmm%d-l%d", os.Getpid(), seq.Add(1)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab cleanup: %v", err)
		}
	})
	return l
}

// Place is where a host of the lab is attached.
type Place string

// Places a host can move to.
const (
	BehindGW1 Place = "gw1"    // on gw1's LAN, behind its NAT
	BehindGW2 Place = "gw2"    // on gw2's LAN, behind its NAT
	BehindGW3 Place = "gw3"    // on gw3's LAN, behind its NAT
	Public    Place = "public" // on a link of its own to inet, with a public address
)

// Addresses a moving host gets: 192.168.<gw>.<n> behind a gateway, and a
// /24 of its own on inet when public (inet is .1 there).
var placeAddrs = map[string]map[Place][2]string{ // host -> place -> {address/24, gateway}
	"host1": {BehindGW1: {Host1Addr, GW1LAN}, BehindGW2: {"192.168.2.3", GW2LAN}, BehindGW3: {"192.168.3.3", GW3LAN}, Public: {"11.4.0.2", "11.4.0.1"}},
	"host2": {BehindGW2: {Host2Addr, GW2LAN}, BehindGW1: {"192.168.1.3", GW1LAN}, BehindGW3: {"192.168.3.2", GW3LAN}, Public: {"11.5.0.2", "11.5.0.1"}},
}

func (l *Lab) role(host *netns.NS) (string, error) {
	switch host {
	case l.Host1:
		return "host1", nil
	case l.Host2:
		return "host2", nil
	}
	return "", fmt.Errorf("lab: only host1 and host2 move, not %s", host.Name)
}

// Where returns where a host is attached now.
func (l *Lab) Where(host *netns.NS) Place {
	l.mu.Lock()
	defer l.mu.Unlock()
	if p, ok := l.where[host]; ok {
		return p
	}
	if host == l.Host2 {
		return BehindGW2
	}
	return BehindGW1
}

// Addr returns the IPv4 address a host has at a place.
func (l *Lab) Addr(host *netns.NS, p Place) string {
	r, _ := l.role(host)
	return placeAddrs[r][p][0]
}

func (l *Lab) placeNS(p Place) *netns.NS {
	switch p {
	case BehindGW1:
		return l.GW1
	case BehindGW2:
		return l.GW2
	case BehindGW3:
		return l.GW3
	}
	return l.Inet
}

// Move attaches host (host1 or host2) at place to: its veth's far end moves
// to that gateway's LAN bridge (or to inet), and the host's address and
// default route change — what a host sees when it roams to another network.
// Its own interface (eth0) stays. The steps are netlink calls, not ip(8)
// processes, so a move takes milliseconds even on a loaded machine.
func (l *Lab) Move(host *netns.NS, to Place) error {
	r, err := l.role(host)
	if err != nil {
		return err
	}
	want, ok := placeAddrs[r][to]
	if !ok {
		return fmt.Errorf("lab: no place %q", to)
	}
	from := l.Where(host)
	if from == to {
		return nil
	}
	fail := func(step string, err error) error {
		return fmt.Errorf("lab: move %s from %s to %s: %s: %w", r, from, to, step, err)
	}
	end := "lan-" + r
	src, dst := l.placeNS(from), l.placeNS(to)
	link, err := src.Handle.LinkByName(end)
	if err != nil {
		return fail("find "+end, err)
	}
	if err := src.Handle.LinkSetNsFd(link, dst.Fd()); err != nil {
		return fail("move "+end, err)
	}
	if link, err = dst.Handle.LinkByName(end); err != nil {
		return fail("find "+end+" after the move", err)
	}
	if to == Public {
		if err := dst.Handle.AddrAdd(link, mustAddr(want[1]+"/24")); err != nil {
			return fail("address inet's end", err)
		}
	} else {
		br, err := dst.Handle.LinkByName("lan")
		if err != nil {
			return fail("find the bridge", err)
		}
		if err := dst.Handle.LinkSetMaster(link, br); err != nil {
			return fail("enslave "+end, err)
		}
	}
	if err := dst.Handle.LinkSetUp(link); err != nil {
		return fail("up "+end, err)
	}
	if err := readdress(host, want[0], want[1]); err != nil {
		return fail("readdress", err)
	}
	l.mu.Lock()
	if l.where == nil {
		l.where = map[*netns.NS]Place{}
	}
	l.where[host] = to
	l.mu.Unlock()
	return nil
}

func mustAddr(cidr string) *netlink.Addr {
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		panic(err)
	}
	return a
}

// readdress gives ns's eth0 (or wan, for a gateway) addr/24 in place of its
// global IPv4 addresses, and a default route via gw.
func readdress(ns *netns.NS, addr, gw string) error { return readdressDev(ns, "eth0", addr, gw) }

func readdressDev(ns *netns.NS, dev, addr, gw string) error {
	link, err := ns.Handle.LinkByName(dev)
	if err != nil {
		return err
	}
	old, err := nldump.Retry(func() ([]netlink.Addr, error) { return ns.Handle.AddrList(link, netlink.FAMILY_V4) })
	if err != nil {
		return err
	}
	for _, a := range old {
		if a.Scope == int(netlink.SCOPE_UNIVERSE) {
			if err := ns.Handle.AddrDel(link, &a); err != nil {
				return err
			}
		}
	}
	if err := ns.Handle.AddrAdd(link, mustAddr(addr+"/24")); err != nil {
		return err
	}
	return defaultVia(ns, link, gw)
}

func defaultVia(ns *netns.NS, link netlink.Link, gw string) error {
	return ns.Handle.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: net.ParseIP(gw),
		Dst: &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}})
}

// Offline takes the host's link down: every route through it goes, its
// address stays (a laptop whose Wi-Fi went away).
func (l *Lab) Offline(host *netns.NS) error {
	link, err := host.Handle.LinkByName("eth0")
	if err == nil {
		err = host.Handle.LinkSetDown(link)
	}
	if err != nil {
		return fmt.Errorf("lab: %s offline: %w", host.Name, err)
	}
	return nil
}

// Online brings the host's link back at its place, with its default route.
func (l *Lab) Online(host *netns.NS) error {
	r, err := l.role(host)
	if err != nil {
		return err
	}
	link, err := host.Handle.LinkByName("eth0")
	if err == nil {
		err = host.Handle.LinkSetUp(link)
	}
	if err == nil {
		err = defaultVia(host, link, placeAddrs[r][l.Where(host)][1])
	}
	if err != nil {
		return fmt.Errorf("lab: %s online: %w", r, err)
	}
	return nil
}

// SetUDPTimeout makes a gateway's NAT forget idle UDP mappings after d
// (conntrack's unreplied and stream timeouts), like the many home routers
// that drop them after 30 s.
func (l *Lab) SetUDPTimeout(gw *netns.NS, d time.Duration) error {
	secs := fmt.Sprint(int(d / time.Second))
	for _, k := range []string{"net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream"} {
		if err := gw.Sysctl(k, secs); err != nil {
			return fmt.Errorf("lab: %s: %w", k, err)
		}
	}
	return nil
}

// Dump returns the links, addresses, routes and bridge ports of every
// namespace, for a failing test's log.
func (l *Lab) Dump() string {
	var b strings.Builder
	for i, n := range l.All() {
		if n == nil {
			continue
		}
		fmt.Fprintf(&b, "== %s\n", Roles[i])
		for _, c := range [][]string{{"ip", "-br", "link"}, {"ip", "-br", "addr"}, {"ip", "route"}, {"ip", "neigh"}, {"bridge", "link"}} {
			out, _ := n.Run(c[0], c[1:]...)
			b.WriteString(out)
		}
	}
	return b.String()
}

// everyFlow matches every conntrack entry.
type everyFlow struct{}

func (everyFlow) MatchConntrackFlow(*netlink.ConntrackFlow) bool { return true }

// FlushConntrack empties ns's conntrack table (IPv4 and IPv6) entry by
// entry: it lists the table and deletes each entry it found, and fails if
// it cannot (a kernel without conntrack over netlink, nf_conntrack_netlink,
// answers EINVAL: hack/vmexec loads it in the VM). Entries that packets in
// flight make meanwhile stay.
func FlushConntrack(ns *netns.NS) error {
	for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if _, err := ns.Handle.ConntrackDeleteFilters(netlink.ConntrackTable, fam, everyFlow{}); err != nil {
			return fmt.Errorf("lab: flush %s's conntrack table (family %d): %w", ns.Name, fam, err)
		}
	}
	return nil
}

// SetWAN renumbers a gateway's WAN side (its NAT's public address changes,
// as when an ISP hands out a new one): the old address goes, addr/24 comes,
// and the default route is put back. The NAT forgets every mapping (its
// whole conntrack table: the kernel flushes masquerade's entries itself,
// but not the port forwards' DNAT entries, which went on rewriting replies
// to the old address), and the internet forgets the old address (the
// router's neighbour entry would still deliver it to the gateway).
func (l *Lab) SetWAN(gw *netns.NS, addr string) error {
	var old []string
	if wan, err := gw.Handle.LinkByName("wan"); err == nil {
		as, _ := nldump.Retry(func() ([]netlink.Addr, error) { return gw.Handle.AddrList(wan, netlink.FAMILY_V4) })
		for _, a := range as {
			old = append(old, a.IP.String())
		}
	}
	via := strings.Join(strings.Split(addr, ".")[:3], ".") + ".1"
	if err := readdressDev(gw, "wan", addr, via); err != nil {
		return fmt.Errorf("lab: renumber %s's WAN to %s: %w", gw.Name, addr, err)
	}
	// In this order: once the internet cannot reach the old address, no
	// packet can make a new entry for it (the port forwards' DNAT rules
	// do not look at the destination address), then the table goes.
	for _, a := range old {
		if a == addr {
			continue
		}
		if _, err := l.Inet.Run("ip", "neigh", "flush", "to", a); err != nil {
			return fmt.Errorf("lab: renumber %s's WAN: %w", gw.Name, err)
		}
	}
	if err := FlushConntrack(gw); err != nil {
		return fmt.Errorf("lab: renumber %s's WAN: %w", gw.Name, err)
	}
	return nil
}
