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
	testenv.HostTier(t, "Kerberos keying between namespaces over UDP, no kernel feature the host lacks")
	testenv.RequireNetNS(t)
	k, ktA, ktB := newRealm(t)
	nsA, nsB := netns.New(t, "kna"), netns.New(t, "knb")
	netns.MustVeth(t, nsA, "va", nsB, "vb")
	nsA.MustAddr(t, "va", "10.0.0.1/24")
	nsB.MustAddr(t, "vb", "10.0.0.2/24")
	addrA, addrB := netip.MustParseAddrPort("10.0.0.1:4500"), netip.MustParseAddrPort("10.0.0.2:4500")
	recA, recB := newRecorder("a"), newRecorder("b")
	logger, logs := testLogger(t)
	runAgent(t, Config{ULA: ulaB, Auth: &Kerberos{Principal: princB, Realm: realm, Keytab: ktB, Krb5Conf: k.Config(t)},
		Transport: listenIn(t, nsB, addrB), Installer: recB, Logger: logger.With("host", princB)},
		PeerConfig{Name: "a", ULA: ulaA, Outer: addrA, Principal: princA})
	runAgent(t, Config{ULA: ulaA, Auth: &Kerberos{Principal: princA, Realm: realm, Keytab: ktA, Krb5Conf: k.Config(t)},
		Transport: listenIn(t, nsA, addrA), Installer: recA, Logger: logger.With("host", princA)},
		PeerConfig{Name: "b", ULA: ulaB, Outer: addrB, Principal: princB})
	waitFor(t, "keying across the veth", func() bool {
		_, okA := recA.peer(ulaB)
		_, okB := recB.peer(ulaA)
		return okA && okB
	})
	pa, _ := recA.peer(ulaB)
	pb, _ := recB.peer(ulaA)
	pairOK(t, pa, pb)
	if pb.Outer != addrA || pa.Outer != addrB {
		t.Errorf("outer addresses: a sees %v, b sees %v", pa.Outer, pb.Outer)
	}
	noKeysLogged(t, logs, recA, recB)
}

// listenIn opens the tunnel-port socket of an agent inside ns.
func listenIn(t *testing.T, ns *netns.NS, addr netip.AddrPort) *UDPTransport {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		t.Fatalf("%s: listen %s: %v", ns.Name, addr, err)
	}
	tr := NewUDPTransport(c)
	t.Cleanup(func() { tr.Close() })
	return tr
}

// runAgent starts an agent with one peer until the test ends.
func runAgent(t *testing.T, cfg Config, peer PeerConfig) *Agent {
	t.Helper()
	ag, err := New(cfg)
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
