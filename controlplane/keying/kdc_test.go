package keying

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/jcmturner/gokrb5/v8/config"
)

// stallProxy sits between clients and a real KDC (UDP and TCP): requests
// that contain stall are never answered, everything else is relayed.
type stallProxy struct {
	addr    netip.AddrPort
	udp     *net.UDPConn
	tcp     *net.TCPListener
	stall   []byte
	mu      sync.Mutex
	stalled int
}

func startStallProxy(t *testing.T, kdc netip.AddrPort, stall string) *stallProxy {
	t.Helper()
	// One port for both: the UDP one may be taken by someone else (then
	// another TCP port is tried).
	var (
		tl   *net.TCPListener
		ul   *net.UDPConn
		port int
	)
	for try := 0; ul == nil; try++ {
		var err error
		tl, err = net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		port = tl.Addr().(*net.TCPAddr).Port
		ul, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
		if err != nil {
			tl.Close()
			if try == 20 {
				t.Fatalf("no UDP port beside a TCP one after 20 tries: %v", err)
			}
		}
	}
	p := &stallProxy{addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)), udp: ul, tcp: tl, stall: []byte(stall)}
	t.Cleanup(func() { ul.Close(); tl.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := ul.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			req := bytes.Clone(buf[:n])
			if p.hold(req) {
				continue
			}
			go func() {
				c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(kdc))
				if err != nil {
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.Write(req)
				rb := make([]byte, 65536)
				if m, err := c.Read(rb); err == nil {
					ul.WriteToUDPAddrPort(rb[:m], from)
				}
			}()
		}
	}()
	go func() {
		for {
			c, err := tl.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var hdr [4]byte
				if _, err := io.ReadFull(c, hdr[:]); err != nil {
					return
				}
				req := make([]byte, binary.BigEndian.Uint32(hdr[:]))
				if _, err := io.ReadFull(c, req); err != nil || p.hold(req) {
					io.Copy(io.Discard, c) // hold the connection open, answer nothing
					return
				}
				k, err := net.DialTimeout("tcp4", kdc.String(), 5*time.Second)
				if err != nil {
					return
				}
				defer k.Close()
				k.Write(append(hdr[:], req...))
				io.Copy(c, k)
			}()
		}
	}()
	return p
}

func (p *stallProxy) hold(req []byte) bool {
	if !bytes.Contains(req, p.stall) {
		return false
	}
	p.mu.Lock()
	p.stalled++
	p.mu.Unlock()
	return true
}

func (p *stallProxy) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stalled
}

// TestSlowKDCStallsOnlyItsPeer: a keys with b and with a third host whose
// service ticket requests the KDC never answers (a proxy in front of the
// real krb5kdc holds them). The fetch for the third host neither holds up
// a's keying with b nor outlives AuthTimeout: the attempt ends with
// ErrKDCUnreachable, and a's next attempt asks again.
func TestSlowKDCStallsOnlyItsPeer(t *testing.T) {
	testenv.HostTier(t, "a slow KDC over UDP sockets, kernel-independent")
	k, ktA, ktB := newRealm(t)
	const princSlow = "host/slow.btmm.test"
	k.AddPrincipal(t, princSlow)
	proxy := startStallProxy(t, k.Addr, "slow.btmm.test")
	conf, err := config.NewFromString(strings.ReplaceAll(k.ClientConfig(), k.Addr.String(), proxy.addr.String()))
	if err != nil {
		t.Fatal(err)
	}
	b := startKrbNode(t, k, "b", princB, ulaB, ktB, nil)
	a := startKrbNode(t, k, "a", princA, ulaA, ktA, func(c *Config) {
		c.Auth.(*Kerberos).Krb5Conf = conf
		c.AuthTimeout = 3 * time.Second
	})
	slow := PeerConfig{Name: "slow", ULA: netip.MustParseAddr("fd00::5"), Outer: netip.MustParseAddrPort("127.0.0.1:9"), Principal: princSlow}
	b.setPeers(t, a.peer)
	start := time.Now()
	a.setPeers(t, slow, b.peer) // the slow peer first
	waitFor(t, "keying with b", func() bool { return b.status(t).Established })
	keyedIn := time.Since(start)
	waitFor(t, "the stalled fetch to give up", func() bool {
		st, _ := a.agent.Status(context.Background())
		for _, s := range st {
			if s.ULA == slow.ULA && s.LastError != nil {
				return true
			}
		}
		return false
	})
	gaveUp := time.Since(start)
	st, _ := a.agent.Status(context.Background())
	var errSlow error
	for _, s := range st {
		if s.ULA == slow.ULA {
			errSlow = s.LastError
		}
	}
	t.Logf("keyed with b after %v; the slow peer's attempt ended after %v: %v (%d requests held)", keyedIn, gaveUp, errSlow, proxy.count())
	if !errors.Is(errSlow, ErrKDCUnreachable) || !errors.Is(errSlow, context.DeadlineExceeded) {
		t.Errorf("slow peer: %v, want ErrKDCUnreachable after the deadline", errSlow)
	}
	if keyedIn >= gaveUp {
		t.Errorf("keying with b (%v) waited for the stalled fetch (ended after %v)", keyedIn, gaveUp)
	}
	if proxy.count() == 0 {
		t.Error("the proxy held nothing: the test did not stall a fetch")
	}
}

// TestServiceTicketCancel: a caller whose context ends stops waiting for
// the KDC at once; another caller asking for the same ticket meanwhile
// shares the one request in flight.
func TestServiceTicketCancel(t *testing.T) {
	k := krbtest.Start(t, realm)
	k.AddPrincipal(t, princA)
	k.AddPrincipal(t, "host/slow.btmm.test")
	_, ktA := k.Keytab(t, "a.keytab", princA)
	proxy := startStallProxy(t, k.Addr, "slow.btmm.test")
	conf, err := config.NewFromString(strings.ReplaceAll(k.ClientConfig(), k.Addr.String(), proxy.addr.String()))
	if err != nil {
		t.Fatal(err)
	}
	kr := &Kerberos{Principal: princA, Realm: realm, Keytab: ktA, Krb5Conf: conf}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := kr.serviceTicket(ctx, "host/slow.btmm.test", time.Now(), time.Hour)
			errc <- err
		}()
	}
	for proxy.count() == 0 {
		time.Sleep(10 * time.Millisecond) // the request is held by the proxy
	}
	cancel()
	for range 2 {
		if err := <-errc; !errors.Is(err, context.Canceled) || !errors.Is(err, ErrKDCUnreachable) {
			t.Errorf("cancelled fetch: %v", err)
		}
	}
	kr.mu.Lock()
	_, inFlight := kr.inflight["host/slow.btmm.test"]
	kr.mu.Unlock()
	if !inFlight {
		t.Error("the callers returned only after the KDC round trip ended, not when cancelled")
	}
	if n := proxy.count(); n != 1 {
		t.Errorf("%d requests for one ticket reached the KDC, want 1 (shared)", n)
	}
}
