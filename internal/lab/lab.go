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
// The "public" addresses come from 11.0.0.0/8 because miniupnpd refuses to
// serve from reserved ranges; the traffic never leaves the namespaces.
package lab

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/btmm/btmm/internal/netns"
)

// Well-known addresses of the lab.
const (
	InetAddr  = "11.0.0.1" // rendezvous DNS server and KDC, on inet's lo
	GW1WAN    = "11.1.0.2"
	GW2WAN    = "11.2.0.2"
	PubAddr   = "11.3.0.2"
	GW1LAN    = "192.168.1.1"
	GW2LAN    = "192.168.2.1"
	Host1Addr = "192.168.1.2"
	Host2Addr = "192.168.2.2"
)

// Roles, in the order Up creates them; a namespace is named <prefix>-<role>.
var Roles = []string{"inet", "gw1", "gw2", "host1", "host2", "pub"}

// Lab is a running lab.
type Lab struct {
	Prefix                            string
	Inet, GW1, GW2, Host1, Host2, Pub *netns.NS
}

// All returns the namespaces in Roles order.
func (l *Lab) All() []*netns.NS { return []*netns.NS{l.Inet, l.GW1, l.GW2, l.Host1, l.Host2, l.Pub} }

// Up builds the lab with namespaces named <prefix>-<role>. On error whatever
// was made is removed again.
func Up(prefix string) (_ *Lab, err error) {
	l := &Lab{Prefix: prefix}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	slots := []**netns.NS{&l.Inet, &l.GW1, &l.GW2, &l.Host1, &l.Host2, &l.Pub}
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
		{l.Pub, "pub", "11.3.0.1/24", "eth0", PubAddr + "/24"},
	} {
		step(netns.Veth(l.Inet, w.ifInet, w.peer, w.peerIf))
		step(l.Inet.AddAddr(w.ifInet, w.inetCIDR))
		step(w.peer.AddAddr(w.peerIf, w.peerCIDR))
		step(w.peer.AddRoute("default", strings.TrimSuffix(w.inetCIDR, "/24"), w.peerIf))
	}
	// Gateways and the hosts behind them.
	for _, g := range []struct {
		gw, host    *netns.NS
		lan, hostIP string
	}{{l.GW1, l.Host1, GW1LAN, Host1Addr}, {l.GW2, l.Host2, GW2LAN, Host2Addr}} {
		step(netns.Veth(g.gw, "lan", g.host, "eth0"))
		step(g.gw.AddAddr("lan", g.lan+"/24"))
		step(g.host.AddAddr("eth0", g.hostIP+"/24"))
		step(g.host.AddRoute("default", g.lan, "eth0"))
		step(g.gw.Sysctl("net.ipv4.ip_forward", "1"))
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
	slots := []**netns.NS{&l.Inet, &l.GW1, &l.GW2, &l.Host1, &l.Host2, &l.Pub}
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
