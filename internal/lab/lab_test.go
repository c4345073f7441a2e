package lab

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

func TestLabReachabilityAndNAT(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "nft", "nftables")
	testenv.RequireBinary(t, "ping", "iputils-ping")
	l := New(t)

	ping := func(n runner, to string) error {
		out, err := n.Run("ping", "-c", "1", "-W", "2", to)
		if err == nil && !strings.Contains(out, " 0% packet loss") {
			err = errSt(out)
		}
		return err
	}
	for _, c := range []struct {
		name string
		from runner
		to   string
	}{
		{"host1->inet", l.Host1, InetAddr},
		{"host2->inet", l.Host2, InetAddr},
		{"host1->pub", l.Host1, PubAddr},
		{"host1->gw2 wan", l.Host1, GW2WAN},
		{"pub->inet", l.Pub, InetAddr},
	} {
		if err := ping(c.from, c.to); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// No way in from outside without a mapping.
	if err := ping(l.Pub, Host1Addr); err == nil {
		t.Error("pub reached host1's private address directly")
	}

	// host1's traffic leaves masqueraded as gw1's WAN address.
	var got string
	var pc net.PacketConn
	if err := l.Pub.Do(func() (err error) { pc, err = net.ListenPacket("udp4", ":9999"); return }); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if err := l.Host1.Do(func() error {
		c, err := net.Dial("udp4", PubAddr+":9999")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("hi"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 16)
	_, from, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	got = from.(*net.UDPAddr).IP.String()
	if got != GW1WAN {
		t.Fatalf("pub saw host1 as %s, want the NAT's %s", got, GW1WAN)
	}
}

type runner interface {
	Run(string, ...string) (string, error)
}

type errSt string

func (e errSt) Error() string { return string(e) }
