package llqclient_test

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/internal/dnsextdtest"
	"github.com/miekg/dns"
)

// Against a server that never signs (dnsextdtest: a test double of Apple's
// dnsextd's signing behaviour, relaying to an in-process btmm-dnsd): by
// default nothing it says is believed and the status names the reason; with
// AcceptUnsigned the LLQs work, events included.

type extLab struct {
	srv   *server.Server
	addr  string // btmm-dnsd itself
	relay *dnsextdtest.Relay
	key   *register.Key // the laptop's
}

// update changes the laptop's AAAA directly at btmm-dnsd.
func (l *extLab) update(t *testing.T, ula string) {
	t.Helper()
	up := new(dns.Msg)
	up.SetUpdate("btmm.example.")
	rr, _ := dns.NewRR("laptop.alice.btmm.example. 60 IN AAAA " + ula)
	up.RemoveRRset([]dns.RR{rr})
	up.Insert([]dns.RR{rr})
	up.SetTsig(l.key.Name, l.key.Algorithm, 300, time.Now().Unix())
	if r, _, err := (&dns.Client{TsigProvider: l.key.Provider()}).Exchange(up, l.addr); err != nil || r.Rcode != dns.RcodeSuccess {
		t.Fatalf("update: %v %v", r, err)
	}
}

func dnsextdLab(t *testing.T) *extLab {
	if testing.Short() {
		t.Skip("btmm-dnsd on 127.0.0.1; skipped under -short")
	}
	srv, err := server.New(server.Config{Zone: "btmm.example.", DataDir: t.TempDir(), Listen: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := srv.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	user, err := srv.AddUser("alice", "hmac-md5") // dnsextd holds the zone's key
	if err != nil {
		t.Fatal(err)
	}
	hk, err := srv.AddHost("alice", "laptop", "")
	if err != nil {
		t.Fatal(err)
	}
	relay, err := dnsextdtest.Start(addrs.DNS, user)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	key, err := register.NewKey(hk.Name, hk.Algorithm, hk.Base64())
	if err != nil {
		t.Fatal(err)
	}
	l := &extLab{srv: srv, addr: addrs.DNS, relay: relay, key: key}
	l.update(t, "fd00::1")
	return l
}

func watch(t *testing.T, c *llqclient.Client) chan []string {
	got := make(chan []string, 16)
	c.Watch("laptop.alice.btmm.example.", dns.TypeAAAA, func(rrs []dns.RR) {
		var s []string
		for _, rr := range rrs {
			s = append(s, rr.(*dns.AAAA).AAAA.String())
		}
		got <- s
	})
	return got
}

func TestServerThatNeverSigns(t *testing.T) {
	l := dnsextdLab(t)
	relay, key := l.relay, l.key
	c, err := llqclient.New(llqclient.Config{Server: relay.Addr, Key: key, Timeout: 200 * time.Millisecond, Tries: 2,
		PollInterval: time.Hour, RetryLLQ: time.Hour}, nil)
	if err != nil {
		t.Fatal(err)
	}
	go c.Run(t.Context())
	got := watch(t, c)
	deadline := time.Now().Add(15 * time.Second)
	for {
		st := c.Status()
		if len(st.Queries) == 1 && st.Queries[0].Mode == llqclient.ModePolling {
			if !strings.Contains(st.Queries[0].Reason, "server does not sign") || st.AcceptUnsigned {
				t.Fatalf("status: %+v", st)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("never fell back: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case s := <-got:
		t.Fatalf("an unsigned answer was believed: %v", s)
	default:
	}
	if relay.Stripped() == 0 {
		t.Fatal("the double stripped nothing: the test proves nothing")
	}
}

func TestAcceptUnsigned(t *testing.T) {
	l := dnsextdLab(t)
	srv, relay, key := l.srv, l.relay, l.key
	c, err := llqclient.New(llqclient.Config{Server: relay.Addr, Key: key, AcceptUnsigned: true, Timeout: 300 * time.Millisecond,
		PollInterval: time.Hour, RetryLLQ: time.Hour}, nil)
	if err != nil {
		t.Fatal(err)
	}
	go c.Run(t.Context())
	got := watch(t, c)
	wait := func(want ...string) {
		t.Helper()
		for {
			select {
			case s := <-got:
				if slices.Equal(s, want) {
					return
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("never saw %q; status %+v", want, c.Status())
			}
		}
	}
	wait("fd00::1")
	// The status is published after the answers are delivered.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		st := c.Status()
		if len(st.Queries) == 1 && st.Queries[0].Mode == llqclient.ModeLLQ && st.AcceptUnsigned {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status: %+v", st)
		}
	}
	// A change arrives as an unsigned event through the double, and our
	// acknowledgement goes back (no retransmission deletes the LLQ).
	l.update(t, "fd00::2")
	wait("fd00::2")
	if relay.Stripped() < 2 {
		t.Fatalf("stripped %d signatures", relay.Stripped())
	}
	time.Sleep(5 * time.Second) // past the server's retransmissions (2 s, 4 s)
	if srv.LLQs() != 1 {
		t.Fatalf("LLQ gone after the event: acknowledgement lost (%d LLQs)", srv.LLQs())
	}
}

// TestWrongSecret: a host whose key file holds another secret than the
// server's (same key name). btmm-dnsd answers BADSIG (unsigned, RFC 8945
// §5.2.2): the registrar and the LLQ client both say the secret differs,
// not "no answer to LLQ setup" (issue 17 rough edge), and btmmctl status
// shows their LastError.
func TestWrongSecret(t *testing.T) {
	l := dnsextdLab(t)
	wrong, err := register.NewKey(l.key.Name, l.key.Algorithm, "d3JvbmctZDNKdmJtY3RkM0p2Ym1jdA==")
	if err != nil {
		t.Fatal(err)
	}
	r, err := register.New(register.Config{Domain: "alice.btmm.example.", Zone: "btmm.example.", Host: "laptop",
		ULA: netip.MustParseAddr("fd00::1"), Label: "AutoTunnel-L", Key: wrong, Server: l.addr,
		Timeout: time.Second, MaxBackoff: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := llqclient.New(llqclient.Config{Server: l.addr, Key: wrong, Lease: time.Hour, Timeout: 500 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	go c.Run(ctx)
	watch(t, c)
	const want = "BADSIG: the secret of key laptop.alice.btmm.example. differs from the server's"
	deadline := time.Now().Add(20 * time.Second)
	for {
		rs, ls := r.Status(), c.Status()
		var reason string
		if len(ls.Queries) == 1 {
			reason = ls.Queries[0].Reason
		}
		if strings.Contains(rs.LastError, want) && strings.Contains(reason, want) {
			if rs.Published || strings.Contains(reason, "no answer") {
				t.Fatalf("registrar %+v, llq %+v", rs, ls)
			}
			t.Logf("registration: %s; llq: %s", rs.LastError, reason)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("registrar: %q; llq: %+v", rs.LastError, ls)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
