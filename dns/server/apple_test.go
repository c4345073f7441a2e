package server_test

import (
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// appleClient behaves as Apple's wide-area client (mDNSResponder's uDNS
// code, as the issue describes it) does, as far as the server can tell: it
// finds the zone of a name by walking up to the nearest SOA, looks for the
// update and LLQ services by SRV at that zone, signs with the key whose name
// is that zone, sends its UDP LLQs unsigned and acknowledges an event by
// echoing its LLQ option. It is a test client written from those facts, not
// Apple's code.
type appleClient struct {
	t      *testing.T
	server string              // where it sends queries (its resolver)
	keys   map[string]tsig.Key // by zone
	conn   *net.UDPConn        // its one UDP socket, for LLQs
}

func newAppleClient(t *testing.T, server string, keys ...tsig.Key) *appleClient {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a := &appleClient{t: t, server: server, keys: map[string]tsig.Key{}, conn: c}
	for _, k := range keys {
		a.keys[dns.CanonicalName(k.Name)] = k
	}
	return a
}

func (a *appleClient) ask(name string, qtype uint16) *dns.Msg {
	a.t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(dns.CanonicalName(name), qtype)
	r, _, err := (&dns.Client{Timeout: 5 * time.Second}).Exchange(m, a.server)
	if err != nil {
		a.t.Fatalf("apple: query %s: %v", name, err)
	}
	return r
}

// zoneOf walks up from name to the nearest SOA.
func (a *appleClient) zoneOf(name string) string {
	a.t.Helper()
	for n := dns.CanonicalName(name); n != "."; {
		r := a.ask(n, dns.TypeSOA)
		for _, rr := range append(r.Answer, r.Ns...) {
			if soa, ok := rr.(*dns.SOA); ok && r.Rcode != dns.RcodeRefused {
				return strings.ToLower(soa.Hdr.Name)
			}
		}
		_, rest, _ := strings.Cut(n, ".")
		n = dns.Fqdn(rest)
	}
	a.t.Fatalf("apple: no zone for %s", name)
	return ""
}

// service finds "_svc._proto.<zone>" by SRV, and its target's address.
func (a *appleClient) service(svc, zone string) string {
	a.t.Helper()
	r := a.ask(svc+"."+zone, dns.TypeSRV)
	if len(r.Answer) == 0 {
		a.t.Fatalf("apple: no %s at %s (%s): registration would fail", svc, zone, dns.RcodeToString[r.Rcode])
	}
	srv := r.Answer[0].(*dns.SRV)
	for _, rr := range r.Extra {
		if x, ok := rr.(*dns.A); ok && strings.EqualFold(x.Hdr.Name, srv.Target) {
			return net.JoinHostPort(x.A.String(), itoa(srv.Port))
		}
	}
	if ar := a.ask(srv.Target, dns.TypeA); len(ar.Answer) > 0 {
		return net.JoinHostPort(ar.Answer[0].(*dns.A).A.String(), itoa(srv.Port))
	}
	a.t.Fatalf("apple: %s target %s has no address", svc, srv.Target)
	return ""
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

// register publishes rrs for name: zone by SOA, server by SRV, key by zone.
func (a *appleClient) register(name string, rrs []dns.RR) int {
	a.t.Helper()
	zone := a.zoneOf(name)
	server := a.service("_dns-update._udp", zone)
	k, ok := a.keys[zone]
	if !ok {
		a.t.Fatalf("apple: no key for zone %s", zone)
	}
	m := new(dns.Msg)
	m.SetUpdate(zone)
	m.Insert(rrs)
	m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
	r, _, err := (&dns.Client{TsigProvider: k.Provider(), Timeout: 5 * time.Second}).Exchange(m, server)
	if err != nil {
		a.t.Fatalf("apple: update: %v", err)
	}
	return r.Rcode
}

// llq sets up an unsigned UDP LLQ on name/qtype at the zone's LLQ server;
// it returns the LLQ id and the ACK, or the rcode it was refused with.
func (a *appleClient) llq(name string, qtype uint16) (uint64, *dns.Msg, int) {
	a.t.Helper()
	server := a.service("_dns-llq._udp", a.zoneOf(name))
	ua, _ := net.ResolveUDPAddr("udp", server)
	exch := func(m *dns.Msg) *dns.Msg {
		b, _ := m.Pack()
		a.conn.WriteToUDP(b, ua)
		for {
			a.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 65535)
			n, _, err := a.conn.ReadFromUDP(buf)
			if err != nil {
				a.t.Fatalf("apple: llq: %v", err)
			}
			r := new(dns.Msg)
			if r.Unpack(buf[:n]) == nil && r.Id == m.Id {
				return r
			}
		}
	}
	ch := exch(llqQuery(name, qtype, llq.OpSetup, 0, 7200))
	o, ok := llq.Option(ch)
	if !ok || ch.Rcode != dns.RcodeSuccess {
		return 0, nil, ch.Rcode
	}
	ack := exch(llqQuery(name, qtype, llq.OpSetup, o.Id, o.LeaseLife))
	return o.Id, ack, ack.Rcode
}

// event waits for an LLQ event and acknowledges it by echoing its option.
func (a *appleClient) event() *dns.Msg {
	a.t.Helper()
	for {
		a.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 65535)
		n, from, err := a.conn.ReadFromUDP(buf)
		if err != nil {
			a.t.Fatalf("apple: no event: %v", err)
		}
		ev := new(dns.Msg)
		if ev.Unpack(buf[:n]) != nil {
			continue
		}
		o, ok := llq.Option(ev)
		if !ok || o.Opcode != llq.OpEvent {
			continue
		}
		ack := new(dns.Msg)
		ack.Id, ack.Response = ev.Id, true
		ack.Question = ev.Question
		llq.SetOption(ack, *o)
		b, _ := ack.Pack()
		a.conn.WriteToUDP(b, from)
		return ev
	}
}

// TestAppleClient: the layout and the switch, as Apple's client sees them.
func TestAppleClient(t *testing.T) {
	srv, addrs, _ := startLogged(t, func(c *server.Config) {
		c.AppleCompat = []string{"alice"}
	})
	alice := addUser(t, srv, "alice", "hmac-md5") // Apple's POSIX config: key name = zone
	mac := newAppleClient(t, addrs.DNS, alice)
	d := ".alice.btmm.example."
	if z := mac.zoneOf("mac" + d); z != "alice.btmm.example." {
		t.Fatalf("SOA walk found %q", z)
	}
	// Register as Back to My Mac does: host AAAA, its AutoTunnel SRV/TXT,
	// the tunnel endpoint's A and the browse PTR; zone and key found as above.
	rc := mac.register("mac"+d, []dns.RR{
		rr(t, "mac"+d+" 60 IN AAAA fd00::aa"),
		rr(t, "_autotunnel._udp.mac"+d+" 60 IN SRV 0 0 4500 AutoTunnel-00-11-22-FF-FE-33-44-55"+d),
		rr(t, "_autotunnel._udp.mac"+d+" 60 IN TXT \"txtvers=1\""),
		rr(t, "AutoTunnel-00-11-22-FF-FE-33-44-55"+d+" 60 IN A 198.51.100.9"),
		rr(t, "_autotunnel._udp"+d+" 60 IN PTR _autotunnel._udp.mac"+d),
	})
	if rc != dns.RcodeSuccess {
		t.Fatalf("Apple-style registration: %s", dns.RcodeToString[rc])
	}
	// Its unsigned UDP LLQ on the browse name (apple_compat covers alice).
	id, ack, rc := mac.llq("_autotunnel._udp"+d, dns.TypePTR)
	if rc != dns.RcodeSuccess || len(ack.Answer) != 1 || ack.IsTsig() != nil {
		t.Fatalf("unsigned LLQ: %s %v", dns.RcodeToString[rc], ack)
	}
	// A btmm host registers with its own key: the Mac gets the event,
	// unsigned, and acknowledges it (so it is not sent again).
	laptop := addHost(t, srv, "alice", "laptop", "")
	update(t, addrs.DNS, laptop, 0, func(m *dns.Msg) { m.Insert(hostRecords(t, "laptop", "fd00::1", "AutoTunnel-L")) })
	ev := mac.event()
	if o, _ := llq.Option(ev); o.Id != id || len(ev.Answer) != 1 || ev.IsTsig() != nil ||
		ev.Answer[0].(*dns.PTR).Ptr != "_autotunnel._udp.laptop"+d {
		t.Fatalf("event: %v", ev)
	}
	mac.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, _, err := mac.conn.ReadFromUDP(make([]byte, 512)); err == nil {
		t.Fatal("event sent again: the echoed acknowledgement was not taken")
	}
	// ...and the btmm host, with its own key, reads the Mac's records.
	if r := signedQuery(t, addrs.DNS, laptop, "mac"+d, dns.TypeAAAA); len(r.Answer) != 1 {
		t.Fatalf("btmm host reading the Mac: %v", r)
	}
}

// TestAppleClientWithoutSwitch: the registration still works (zone found by
// the public SOA, services by the public SRVs, UPDATE signed), but the
// unsigned LLQ is REFUSED.
func TestAppleClientWithoutSwitch(t *testing.T) {
	srv, addrs, log := startLogged(t, nil)
	alice := addUser(t, srv, "alice", "")
	mac := newAppleClient(t, addrs.DNS, alice)
	d := ".alice.btmm.example."
	if rc := mac.register("mac"+d, []dns.RR{rr(t, "mac"+d+" 60 IN AAAA fd00::aa")}); rc != dns.RcodeSuccess {
		t.Fatalf("registration: %s", dns.RcodeToString[rc])
	}
	if _, _, rc := mac.llq("mac"+d, dns.TypeAAAA); rc != dns.RcodeRefused {
		t.Fatalf("unsigned LLQ without apple_compat: %s", dns.RcodeToString[rc])
	}
	if !strings.Contains(log.String(), "apple_compat is off for this user") {
		t.Fatalf("refusal reason not logged:\n%s", log.String())
	}
}
