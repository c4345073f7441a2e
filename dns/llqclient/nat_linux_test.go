//go:build linux

package llqclient_test

import (
	"context"
	"errors"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/internal/lab"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// udpIn is a Transport whose socket lives in a network namespace.
type udpIn struct{ c *net.UDPConn }

func (u udpIn) Send(b []byte) error { _, err := u.c.Write(b); return err }
func (u udpIn) Close() error        { return u.c.Close() }
func (u udpIn) Recv() ([]byte, error) {
	buf := make([]byte, 65535)
	for {
		n, err := u.c.Read(buf)
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue // ICMP port unreachable: not the end of the transport
			}
			return nil, err
		}
		return append([]byte(nil), buf[:n]...), nil
	}
}

// TestKeepAliveThroughNAT: the LLQ client behind the lab's NAT gateway
// (nftables masquerade, this kernel's conntrack told to forget idle UDP
// flows after 3 s, as many home routers do after 30 s), btmm-dnsd on the
// lab's internet side. Without KeepAlive, a change made after 8 s of quiet
// never arrives (the server's events die at the NAT: the mapping they were
// sent to is gone); with KeepAlive (1 s) it arrives as an event.
func TestKeepAliveThroughNAT(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "nft", "nftables")
	l := lab.New(t)
	if err := l.SetUDPTimeout(l.GW1, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	var srv *server.Server
	if err := l.Inet.Do(func() (err error) {
		srv, err = server.New(server.Config{Zone: "btmm.example.", DataDir: t.TempDir(), Listen: lab.InetAddr + ":53",
			ServerAddrs: []string{lab.InetAddr}}, nil)
		if err != nil {
			return err
		}
		_, err = srv.Start(context.Background())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if _, err := srv.AddUser("alice", ""); err != nil {
		t.Fatal(err)
	}
	hk, err := srv.AddHost("alice", "laptop", "")
	if err != nil {
		t.Fatal(err)
	}
	key, err := register.NewKey(hk.Name, hk.Algorithm, hk.Base64())
	if err != nil {
		t.Fatal(err)
	}
	server := lab.InetAddr + ":53"
	update := func(ula string) {
		t.Helper()
		up := new(dns.Msg)
		up.SetUpdate("alice.btmm.example.")
		rr, _ := dns.NewRR("laptop.alice.btmm.example. 600 IN AAAA " + ula)
		up.RemoveRRset([]dns.RR{rr})
		up.Insert([]dns.RR{rr})
		up.SetTsig(key.Name, key.Algorithm, 300, time.Now().Unix())
		if err := l.Inet.Do(func() error {
			r, _, err := (&dns.Client{TsigProvider: key.Provider(), Timeout: 5 * time.Second}).Exchange(up, server)
			if err == nil && r.Rcode != dns.RcodeSuccess {
				t.Errorf("update: %s", dns.RcodeToString[r.Rcode])
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	update("fd00::1")
	dial := func(_ context.Context, s string) (llqclient.Transport, error) {
		var c *net.UDPConn
		err := l.Host1.Do(func() (err error) {
			raddr, err := net.ResolveUDPAddr("udp", s)
			if err != nil {
				return err
			}
			c, err = net.DialUDP("udp", nil, raddr)
			return err
		})
		return udpIn{c}, err
	}
	for _, tc := range []struct {
		name      string
		keepAlive time.Duration
		ula       string
		arrives   bool
	}{{"without keepalive", -1, "fd00::2", false}, {"with keepalive", time.Second, "fd00::3", true}} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := llqclient.New(llqclient.Config{Server: server, Key: key, Dial: dial, KeepAlive: tc.keepAlive,
				PollInterval: time.Hour, RetryLLQ: time.Hour}, nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan struct{})
			go func() { c.Run(ctx); close(done) }()
			defer func() { cancel(); <-done }()
			got := watch(t, c)
			waitAnswer := func(want string, d time.Duration) bool {
				for deadline := time.After(d); ; {
					select {
					case s := <-got:
						if slices.Contains(s, want) {
							return true
						}
					case <-deadline:
						return false
					}
				}
			}
			current := "fd00::1"
			if tc.arrives {
				current = "fd00::2" // what the first subtest left
			}
			if !waitAnswer(current, 10*time.Second) {
				t.Fatalf("no LLQ answer %s: %+v", current, c.Status())
			}
			time.Sleep(8 * time.Second) // the NAT forgets a quiet flow after 3 s
			update(tc.ula)
			arrived := waitAnswer(tc.ula, 10*time.Second)
			t.Logf("%s: the change after 8 s of quiet arrived: %v (%d LLQs at the server)", tc.name, arrived, srv.LLQs())
			if arrived != tc.arrives {
				t.Errorf("event arrived %v, want %v; status %+v", arrived, tc.arrives, c.Status())
			}
		})
	}
}
