package server_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

func addHost(t *testing.T, srv *server.Server, user, host, alg string) tsig.Key {
	t.Helper()
	k, err := srv.AddHost(user, host, alg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// hostRecords is what dns/register publishes for host with its key.
func hostRecords(t *testing.T, host, ula, label string) []dns.RR {
	d := ".alice.btmm.example."
	return []dns.RR{
		rr(t, host+d+" 60 IN AAAA "+ula),
		rr(t, "_autotunnel._udp."+host+d+" 60 IN SRV 0 0 4500 "+label+d),
		rr(t, "_autotunnel._udp."+host+d+" 60 IN TXT \"txtvers=1\""),
		rr(t, label+d+" 60 IN A 198.51.100.7"),
		rr(t, "_autotunnel._udp"+d+" 60 IN PTR _autotunnel._udp."+host+d),
	}
}

func TestHostKeys(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	addUser(t, srv, "alice", "")
	laptop := addHost(t, srv, "alice", "laptop", "hmac-md5")
	desktop := addHost(t, srv, "alice", "desktop", "")
	if laptop.Name != "laptop.alice.btmm.example." {
		t.Fatalf("host key name %q", laptop.Name)
	}
	for _, h := range []struct {
		k                tsig.Key
		host, ula, label string
	}{{laptop, "laptop", "fd00::1", "AutoTunnel-L"}, {desktop, "desktop", "fd00::d", "AutoTunnel-D"}} {
		if r := update(t, addrs.DNS, h.k, 3600, func(m *dns.Msg) { m.Insert(hostRecords(t, h.host, h.ula, h.label)) }); r.Rcode != dns.RcodeSuccess {
			t.Fatalf("%s registers: %s", h.host, dns.RcodeToString[r.Rcode])
		}
	}
	// The laptop follows the desktop with LLQs signed by its own key.
	c := newLLQClient(t, addrs.DNS, laptop)
	id, ack := c.setup("desktop.alice.btmm.example.", dns.TypeAAAA)
	if len(ack.Answer) != 1 {
		t.Fatalf("laptop's LLQ on the desktop: %v", ack)
	}
	browse := newLLQClient(t, addrs.DNS, laptop)
	browseID, _ := browse.setup("_autotunnel._udp.alice.btmm.example.", dns.TypePTR)
	// The desktop follows the laptop: its LLQ ends with its key.
	newLLQClient(t, addrs.DNS, desktop).setup("laptop.alice.btmm.example.", dns.TypeAAAA)
	if srv.LLQs() != 3 {
		t.Fatalf("LLQs: %d", srv.LLQs())
	}

	// The laptop cannot touch the desktop's records.
	if r := update(t, addrs.DNS, laptop, 0, func(m *dns.Msg) {
		m.Insert([]dns.RR{rr(t, "desktop.alice.btmm.example. 60 IN AAAA fd00::1")})
	}); r.Rcode != dns.RcodeRefused {
		t.Fatalf("laptop wrote the desktop's name: %s", dns.RcodeToString[r.Rcode])
	}

	// delhost: the desktop's records go at once, and the laptop's LLQs
	// learn it (the removal pushed, not left to the lease).
	n, err := srv.RemoveHost("alice", "desktop")
	if err != nil || n != 5 {
		t.Fatalf("RemoveHost: %d records, %v", n, err)
	}
	gotRemoval := func(c *llqClient, id uint64, what string) {
		t.Helper()
		for {
			ev, err := c.recv(10 * time.Second)
			if err != nil {
				t.Fatalf("no removal event for %s: %v", what, err)
			}
			if o, ok := llq.Option(ev); ok && o.Opcode == llq.OpEvent && o.Id == id {
				if len(ev.Answer) != 1 || ev.Answer[0].Header().Ttl != llq.RemovedTTL {
					t.Fatalf("%s event: %v", what, ev)
				}
				return
			}
		}
	}
	gotRemoval(c, id, "the desktop's AAAA")
	gotRemoval(browse, browseID, "the desktop's PTR")
	for _, name := range []string{"desktop.alice.btmm.example.", "autotunnel-d.alice.btmm.example.", "_autotunnel._udp.desktop.alice.btmm.example."} {
		if q := signedQuery(t, addrs.DNS, laptop, name, dns.TypeANY); len(q.Answer) != 0 {
			t.Fatalf("%s still answers: %v", name, q.Answer)
		}
	}
	if q := signedQuery(t, addrs.DNS, laptop, "_autotunnel._udp.alice.btmm.example.", dns.TypePTR); len(q.Answer) != 1 {
		t.Fatalf("browse set after delhost: %v", q.Answer)
	}
	// The desktop's key is gone: BADKEY.
	data, _ := signedUpdate(t, desktop, time.Now(), 300, hostRecords(t, "desktop", "fd00::d", "AutoTunnel-D")...)
	if r, _ := rawExchange(t, addrs.DNS, data); r.Rcode != dns.RcodeNotAuth || r.IsTsig() == nil || r.IsTsig().Error != dns.RcodeBadKey {
		t.Fatalf("removed key: %v", r)
	}
	if srv.LLQs() != 2 {
		t.Fatalf("LLQs: %d", srv.LLQs())
	}
}

// signedQuery asks with a key (private records need one).
func signedQuery(t *testing.T, addr string, k tsig.Key, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	sign(m, k)
	r, _, err := client(k).Exchange(m, addr)
	if err != nil {
		t.Fatalf("query %s: %v", name, err)
	}
	if r.Rcode == dns.RcodeRefused {
		t.Fatalf("query %s with key %s refused", name, k.Name)
	}
	return r
}

func TestAddHostChecks(t *testing.T) {
	dir := t.TempDir()
	u := server.NewUsers(dir, zoneName)
	if _, err := u.AddHost("alice", "laptop", ""); err == nil {
		t.Fatal("host of a user that does not exist")
	}
	if _, err := u.Add("ns", ""); !errors.Is(err, server.ErrReserved) {
		t.Fatalf("user ns (owns ns.btmm.example.): %v", err)
	}
	u2 := server.NewUsers(dir, zoneName)
	u2.ServerName = "dns.alice.btmm.example."
	if _, err := u2.Add("alice", ""); !errors.Is(err, server.ErrReserved) {
		t.Fatalf("user owning the server's name: %v", err)
	}
	if _, err := u.Add("alice", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := u2.AddHost("alice", "dns", ""); !errors.Is(err, server.ErrReserved) {
		t.Fatalf("host owning the server's name: %v", err)
	}
	for _, bad := range []string{"AutoTunnel-00-11", "autotunnel-x", "_x", "a.b", "Laptop", ""} {
		if _, err := u.AddHost("alice", bad, ""); err == nil {
			t.Errorf("host %q accepted", bad)
		}
	}
	k, err := u.AddHost("alice", "laptop", "hmac-sha512")
	if err != nil || k.Name != "laptop.alice.btmm.example." || k.Algorithm != tsig.HmacSHA512 {
		t.Fatalf("%v %v", k, err)
	}
	if _, err := u.AddHost("alice", "laptop", ""); err == nil {
		t.Fatal("duplicate host")
	}
	if hs, _ := u.Hosts("alice"); fmt.Sprint(hs) != "[laptop]" {
		t.Fatalf("hosts %v", hs)
	}
	if user, host, ok := u.Principal("Laptop.Alice.btmm.example."); !ok || user != "alice" || host != "laptop" {
		t.Fatalf("principal %q %q %v", user, host, ok)
	}
	if _, _, ok := u.Principal("x.laptop.alice.btmm.example."); ok {
		t.Fatal("three labels are no principal")
	}
	if err := u.Remove("alice"); err != nil {
		t.Fatal(err)
	}
	if hs, _ := u.Hosts("alice"); len(hs) != 0 || strings.Contains(fmt.Sprint(hs), "laptop") {
		t.Fatalf("hosts left after deluser: %v", hs)
	}
}

func TestRemoveUser(t *testing.T) {
	srv, addrs := startServer(t, t.TempDir(), nil)
	addUser(t, srv, "alice", "")
	bob := addUser(t, srv, "bob", "")
	laptop := addHost(t, srv, "alice", "laptop", "")
	update(t, addrs.DNS, laptop, 0, func(m *dns.Msg) { m.Insert(hostRecords(t, "laptop", "fd00::1", "AutoTunnel-L")) })
	update(t, addrs.DNS, bob, 0, func(m *dns.Msg) { m.Insert([]dns.RR{rr(t, "pc.bob.btmm.example. 60 IN AAAA fd00::2")}) })
	newLLQClient(t, addrs.DNS, laptop).setup("laptop.alice.btmm.example.", dns.TypeAAAA)
	n, err := srv.RemoveUser("alice")
	if err != nil || n != 5 {
		t.Fatalf("RemoveUser: %d, %v", n, err)
	}
	recs, _ := srv.Store().All()
	if len(recs) != 1 || srv.LLQs() != 0 {
		t.Fatalf("after deluser: %v, %d LLQs", recs, srv.LLQs())
	}
	// alice's zone is gone; the host's key with it.
	if r := unsigned(t, addrs.DNS, "alice.btmm.example.", dns.TypeSOA); r.Rcode != dns.RcodeNameError {
		t.Fatalf("alice's SOA after deluser: %v", r)
	}
	data, _ := signedUpdate(t, laptop, time.Now(), 300, rr(t, "laptop.alice.btmm.example. 60 IN AAAA fd00::1"))
	if r, _ := rawExchange(t, addrs.DNS, data); r.IsTsig() == nil || r.IsTsig().Error != dns.RcodeBadKey {
		t.Fatalf("host key after deluser: %v", r)
	}
}
