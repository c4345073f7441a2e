//go:build linux

package keying

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// TestNetnsKerberosKeying runs the two agents in two network namespaces
// joined by a veth, each on its own tunnel-port socket (UDP 4500 on its
// veth address), with a real KDC: the keying crosses a real link and both
// sides install one matching SA pair; the responder learns the initiator's
// outer address from the authenticated exchange.
func TestNetnsKerberosKeying(t *testing.T) {
	testenv.RequireNetNS(t)
	k, ktA, ktB := newRealm(t)
	nsA, nsB := netns.New(t, "kna"), netns.New(t, "knb")
	netns.MustVeth(t, nsA, "va", nsB, "vb")
	nsA.MustAddr(t, "va", "10.0.0.1/24")
	nsB.MustAddr(t, "vb", "10.0.0.2/24")
	listen := func(n *netns.NS, addr string) *UDPTransport {
		var c *net.UDPConn
		if err := n.Do(func() (err error) {
			c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
			return err
		}); err != nil {
			t.Fatalf("%s: listen %s: %v", n.Name, addr, err)
		}
		tr := NewUDPTransport(c)
		t.Cleanup(func() { tr.Close() })
		return tr
	}
	trA, trB := listen(nsA, "10.0.0.1:4500"), listen(nsB, "10.0.0.2:4500")
	recA, recB := newRecorder("a"), newRecorder("b")
	logger, logs := testLogger(t)
	run := func(ula netip.Addr, princ string, tr *UDPTransport, rec *recorder, peer PeerConfig) *Agent {
		kt := ktA
		if princ == princB {
			kt = ktB
		}
		ag, err := New(Config{ULA: ula, Auth: &Kerberos{Principal: princ, Realm: realm, Keytab: kt, Krb5Conf: k.Config(t)},
			Transport: tr, Installer: rec, Logger: logger.With("host", princ)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { ag.Run(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done })
		if err := ag.SetPeers(ctx, []PeerConfig{peer}); err != nil {
			t.Fatal(err)
		}
		return ag
	}
	run(ulaB, princB, trB, recB, PeerConfig{Name: "a", ULA: ulaA, Outer: netip.MustParseAddrPort("10.0.0.1:4500"), Principal: princA})
	run(ulaA, princA, trA, recA, PeerConfig{Name: "b", ULA: ulaB, Outer: netip.MustParseAddrPort("10.0.0.2:4500"), Principal: princB})
	waitFor(t, "keying across the veth", func() bool {
		_, okA := recA.peer(ulaB)
		_, okB := recB.peer(ulaA)
		return okA && okB
	})
	pa, _ := recA.peer(ulaB)
	pb, _ := recB.peer(ulaA)
	pairOK(t, pa, pb)
	if pb.Outer != netip.MustParseAddrPort("10.0.0.1:4500") || pa.Outer != netip.MustParseAddrPort("10.0.0.2:4500") {
		t.Errorf("outer addresses: a sees %v, b sees %v", pa.Outer, pb.Outer)
	}
	noKeysLogged(t, logs, recA, recB)
}
