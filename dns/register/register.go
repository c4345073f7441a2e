package register

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// Defaults (RFC 6281 §5.2: leases between 30 minutes and 2 hours, typically 90).
const (
	DefaultLease      = 90 * time.Minute
	DefaultTTL        = 60 * time.Second
	DefaultMaxBackoff = 5 * time.Minute
	minBackoff        = time.Second
	shutdownTimeout   = 5 * time.Second
)

// Config describes this host's registration.
type Config struct {
	Domain string // the user's domain, e.g. "alice.btmm.example."
	Zone   string // the zone updates name; default Domain
	Host   string // this host's label, e.g. "laptop"
	ULA    netip.Addr
	Label  string // AutoTunnel label (identity.Identity.Label())
	// Outer is where peers reach our tunnel port: the NAT's public
	// address and mapped port, or our own address and port. Until it is
	// valid only AAAA, TXT and the browse PTR are published; change it
	// with SetOuter.
	Outer        netip.AddrPort
	Capabilities Capabilities
	Key          *Key // TSIG key; required

	// Server is the update server "host:port". Empty: discover it by SRV
	// (_dns-update-tls._tcp.<Domain> first when TLS is set, then
	// _dns-update._udp.<Domain>) through Resolver.
	Server   string
	Resolver string      // "host:port" for SRV discovery; default: first nameserver of /etc/resolv.conf
	TLS      *tls.Config // enables DNS over TLS to the update server

	Lease      time.Duration // requested lease; default DefaultLease
	TTL        time.Duration // record TTL; default DefaultTTL
	MaxBackoff time.Duration // default DefaultMaxBackoff
	Timeout    time.Duration // per exchange; default 3s
	// AcceptUnsigned believes unsigned answers from this server (one that
	// never signs, such as Apple's dnsextd); see ResponsePolicy.
	AcceptUnsigned bool
	// Rand is the jitter source; nil uses the runtime's random numbers.
	Rand *rand.Rand
}

// Status is a snapshot for btmmctl.
type Status struct {
	Server      string        // update server in use ("" before discovery)
	Published   bool          // our records are on the server (as far as we know)
	Lease       time.Duration // lease the server granted (or the one we asked for)
	LeaseEchoed bool          // the server answered with an Update Lease option
	LastSuccess time.Time
	NextAttempt time.Time
	Failures    int    // consecutive failed attempts
	LastError   string // of the last failed attempt
	// AcceptUnsigned: unsigned answers from the server are believed
	// (Config.AcceptUnsigned).
	AcceptUnsigned bool `json:",omitempty"`
}

// Registrar publishes and refreshes one host's records. Create it with New,
// drive it with Run; SetOuter and SetCapabilities may be called from any
// goroutine at any time and are published at once.
type Registrar struct {
	cfg   Config
	names Names
	log   *slog.Logger

	// exchange sends one message; tests replace it.
	exchange func(ctx context.Context, m *dns.Msg, server, network string) (*dns.Msg, error)

	changed chan struct{}
	// republish: the next wake-up is a network change (Republish):
	// forget the failure count, so a failed first try retries soon.
	republish atomic.Bool

	mu        sync.Mutex
	outer     netip.AddrPort
	caps      Capabilities
	status    Status
	published []dns.RR // what the server has from us, for deletion
	server    string
	network   string
	// tlsName is the discovered server's SRV target: the name its TLS
	// certificate is verified against ("" for a configured server).
	tlsName string
}

// New checks cfg and returns a Registrar. It does no I/O.
func New(cfg Config, log *slog.Logger) (*Registrar, error) {
	if cfg.Zone == "" {
		cfg.Zone = cfg.Domain
	}
	cfg.Zone = dns.Fqdn(cfg.Zone)
	cfg.Domain = dns.Fqdn(cfg.Domain)
	names, err := NamesFor(cfg.Host, cfg.Label, cfg.Domain)
	if err != nil {
		return nil, err
	}
	if !dns.IsSubDomain(cfg.Zone, cfg.Domain) {
		return nil, fmt.Errorf("register: domain %s is not inside zone %s", cfg.Domain, cfg.Zone)
	}
	if !identity.IsULA(cfg.ULA) {
		return nil, fmt.Errorf("register: %v is not an IPv6 ULA", cfg.ULA)
	}
	if cfg.Key == nil {
		return nil, errors.New("register: a TSIG key is required")
	}
	if err := checkOuter(cfg.Outer); err != nil && cfg.Outer.IsValid() {
		return nil, err
	}
	if err := cfg.Capabilities.Validate(); err != nil {
		return nil, fmt.Errorf("register: %w", err)
	}
	if cfg.Lease == 0 {
		cfg.Lease = DefaultLease
	}
	if cfg.Lease < 2*time.Second || cfg.Lease > 1<<31*time.Second {
		return nil, fmt.Errorf("register: lease %v out of range", cfg.Lease)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 3 * time.Second
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Registrar{
		cfg:     cfg,
		names:   names,
		log:     log.With("host", names.Host),
		changed: make(chan struct{}, 1),
		outer:   cfg.Outer,
		caps:    cfg.Capabilities,
		status:  Status{AcceptUnsigned: cfg.AcceptUnsigned},
	}
	r.exchange = r.netExchange
	return r, nil
}

func checkOuter(ap netip.AddrPort) error {
	if !ap.Addr().Is4() || ap.Port() == 0 {
		return fmt.Errorf("register: outer address %v is not IPv4:port", ap)
	}
	return nil
}

// Names returns the names this host publishes.
func (r *Registrar) Names() Names { return r.names }

// SetOuter changes the published tunnel address (A + SRV port). An invalid
// address is refused and changes nothing.
func (r *Registrar) SetOuter(ap netip.AddrPort) error {
	if err := checkOuter(ap); err != nil {
		return err
	}
	r.mu.Lock()
	same := r.outer == ap
	r.outer = ap
	r.mu.Unlock()
	if !same {
		r.poke()
	}
	return nil
}

// SetCapabilities changes the published TXT record.
func (r *Registrar) SetCapabilities(c Capabilities) error {
	if err := c.Validate(); err != nil {
		return fmt.Errorf("register: %w", err)
	}
	r.mu.Lock()
	same := r.caps.Equal(c)
	r.caps = c
	r.mu.Unlock()
	if !same {
		r.poke()
	}
	return nil
}

// Republish sends the records again at once, changed or not, and restarts
// the retry backoff: call it when this host's network changed (RFC 6281
// §5.2), so the records are fresh without waiting for the lease refresh or
// a backoff that grew while the host was offline.
func (r *Registrar) Republish() {
	r.republish.Store(true)
	r.poke()
}

func (r *Registrar) poke() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// Status returns a snapshot.
func (r *Registrar) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Records returns the records Run publishes now.
func (r *Registrar) Records() []dns.RR {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.recordsLocked()
}

func (r *Registrar) recordsLocked() []dns.RR {
	ttl := uint32(r.cfg.TTL / time.Second)
	hdr := func(name string, t uint16) dns.RR_Header {
		return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: ttl}
	}
	rrs := []dns.RR{
		&dns.AAAA{Hdr: hdr(r.names.Host, dns.TypeAAAA), AAAA: r.cfg.ULA.AsSlice()},
		&dns.TXT{Hdr: hdr(r.names.Instance, dns.TypeTXT), Txt: r.caps.TXT()},
		&dns.PTR{Hdr: hdr(r.names.Browse, dns.TypePTR), Ptr: r.names.Instance},
	}
	if r.outer.IsValid() {
		rrs = append(rrs,
			&dns.SRV{Hdr: hdr(r.names.Instance, dns.TypeSRV), Priority: 0, Weight: 0, Port: r.outer.Port(), Target: r.names.Target},
			&dns.A{Hdr: hdr(r.names.Target, dns.TypeA), A: r.outer.Addr().AsSlice()},
		)
	}
	return rrs
}

// Run publishes the records, refreshes them before the lease runs out
// (at 75-85% of it), publishes changes at once and backs off with jitter on
// errors. When ctx ends it deletes the records it published and returns nil,
// or the deletion's error.
func (r *Registrar) Run(ctx context.Context) error {
	failures := 0
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		wait, err := r.publishOnce(ctx)
		if ctx.Err() != nil {
			return r.shutdown(ctx)
		}
		if err != nil {
			failures++
			wait = Backoff(failures, r.cfg.MaxBackoff, r.rand())
			r.log.Warn("dns update failed", "err", err, "failures", failures, "retry_in", wait.Round(time.Millisecond))
		} else {
			failures = 0
		}
		r.mu.Lock()
		r.status.Failures = failures
		if err != nil {
			r.status.LastError = err.Error()
		}
		r.status.NextAttempt = time.Now().Add(wait)
		r.mu.Unlock()
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return r.shutdown(ctx)
		case <-timer.C:
		case <-r.changed:
			timer.Stop() // Go ≥ 1.23: no stale tick to drain
			if r.republish.Swap(false) {
				failures = 0
			}
		}
	}
}

func (r *Registrar) rand() func() float64 {
	if r.cfg.Rand != nil {
		return r.cfg.Rand.Float64
	}
	return rand.Float64
}

// Backoff is the wait after n consecutive failures: 1s doubling up to max,
// then a uniformly random point in its upper half ("equal jitter").
func Backoff(n int, max time.Duration, rnd func() float64) time.Duration {
	d := minBackoff
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	return d/2 + time.Duration(rnd()*float64(d/2))
}

// RefreshAfter is when to refresh a lease granted now: at 75% of it plus up
// to 10% jitter, so a server restart does not bring every host back at once.
func RefreshAfter(lease time.Duration, rnd func() float64) time.Duration {
	return lease*3/4 + time.Duration(rnd()*float64(lease/10))
}

// publishOnce sends one update and returns when to refresh.
func (r *Registrar) publishOnce(ctx context.Context) (time.Duration, error) {
	server, network, err := r.serverFor(ctx)
	if err != nil {
		return 0, err
	}
	r.mu.Lock()
	rrs := r.recordsLocked()
	old := r.published
	r.mu.Unlock()

	m := r.updateMsg(rrs, old)
	reply, err := r.exchange(ctx, m, server, network)
	if err != nil {
		r.forgetServer()
		return 0, fmt.Errorf("dns update to %s: %w", server, err)
	}
	if reply.Rcode != dns.RcodeSuccess {
		return 0, fmt.Errorf("dns update to %s: %s", server, dns.RcodeToString[reply.Rcode])
	}
	lease, echoed := r.cfg.Lease, false
	if opt := reply.IsEdns0(); opt != nil {
		for _, o := range opt.Option {
			if ul, ok := o.(*dns.EDNS0_UL); ok && ul.Lease > 0 {
				lease, echoed = time.Duration(ul.Lease)*time.Second, true
			}
		}
	}
	now := time.Now()
	r.mu.Lock()
	changed := !sameRRs(r.published, rrs)
	r.published = rrs
	r.status.Published = true
	r.status.Server = server
	r.status.Lease = lease
	r.status.LeaseEchoed = echoed
	r.status.LastSuccess = now
	r.status.LastError = ""
	r.mu.Unlock()
	if changed {
		r.log.Info("published", "server", server, "lease", lease, "lease_echoed", echoed, "records", len(rrs))
	} else {
		r.log.Debug("refreshed", "server", server, "lease", lease, "lease_echoed", echoed)
	}
	return RefreshAfter(lease, r.rand()), nil
}

func sameRRs(a, b []dns.RR) bool {
	return slices.EqualFunc(a, b, func(x, y dns.RR) bool { return dns.IsDuplicate(x, y) })
}

// updateMsg builds the RFC 2136 update: for each name+type we own, delete the
// RRset and add ours (so a stale value never lingers), delete specific old
// records that left the set (e.g. an old target's A), add our browse PTR
// (a shared RRset: only our one record is ever deleted), lease attached.
func (r *Registrar) updateMsg(rrs, old []dns.RR) *dns.Msg {
	m := new(dns.Msg)
	m.SetUpdate(r.cfg.Zone)
	var stale []dns.RR
	for _, o := range old {
		if !slices.ContainsFunc(rrs, func(n dns.RR) bool {
			return strings.EqualFold(n.Header().Name, o.Header().Name) && n.Header().Rrtype == o.Header().Rrtype
		}) {
			stale = append(stale, o)
		}
	}
	if len(stale) > 0 {
		r.removeMsg(m, stale)
	}
	var sets []dns.RR
	for _, rr := range rrs {
		if rr.Header().Rrtype != dns.TypePTR {
			sets = append(sets, rr)
		}
	}
	m.RemoveRRset(sets)
	m.Insert(rrs)
	r.addLease(m, r.cfg.Lease)
	return m
}

// removeMsg adds deletions of rrs: whole RRsets for names we own, the single
// record for the shared browse PTR.
func (r *Registrar) removeMsg(m *dns.Msg, rrs []dns.RR) {
	var sets, single []dns.RR
	for _, rr := range rrs {
		if rr.Header().Rrtype == dns.TypePTR {
			single = append(single, rr)
		} else {
			sets = append(sets, rr)
		}
	}
	if len(sets) > 0 {
		m.RemoveRRset(sets)
	}
	if len(single) > 0 {
		m.Remove(single)
	}
}

func (r *Registrar) addLease(m *dns.Msg, lease time.Duration) {
	opt := &dns.OPT{Hdr: dns.RR_Header{Name: ".", Rrtype: dns.TypeOPT}}
	opt.SetUDPSize(dns.DefaultMsgSize)
	opt.Option = append(opt.Option, &dns.EDNS0_UL{Code: dns.EDNS0UL, Lease: uint32(lease / time.Second)})
	m.Extra = append(m.Extra, opt)
}

// shutdown deletes what we published, with a fresh deadline (ctx is done).
func (r *Registrar) shutdown(ctx context.Context) error {
	r.mu.Lock()
	old := r.published
	server, network := r.server, r.network
	r.mu.Unlock()
	if len(old) == 0 {
		return nil
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	if server == "" {
		var err error
		if server, network, err = r.serverFor(dctx); err != nil {
			return fmt.Errorf("register: delete records: %w", err)
		}
	}
	m := new(dns.Msg)
	m.SetUpdate(r.cfg.Zone)
	r.removeMsg(m, old)
	reply, err := r.exchange(dctx, m, server, network)
	if err == nil && reply.Rcode != dns.RcodeSuccess {
		err = errors.New(dns.RcodeToString[reply.Rcode])
	}
	if err != nil {
		r.log.Warn("could not delete records at shutdown; they expire with the lease", "err", err)
		return fmt.Errorf("register: delete records at %s: %w", server, err)
	}
	r.mu.Lock()
	r.published = nil
	r.status.Published = false
	r.mu.Unlock()
	r.log.Info("deleted records", "server", server)
	return nil
}

func (r *Registrar) forgetServer() {
	if r.cfg.Server != "" {
		return
	}
	r.mu.Lock()
	r.server = ""
	r.mu.Unlock()
}

// serverFor returns the update server, discovering it when needed.
func (r *Registrar) serverFor(ctx context.Context) (string, string, error) {
	network := "udp"
	if r.cfg.TLS != nil {
		network = "tcp-tls"
	}
	if r.cfg.Server != "" {
		r.mu.Lock()
		r.server, r.network = r.cfg.Server, network
		r.mu.Unlock()
		return r.cfg.Server, network, nil
	}
	r.mu.Lock()
	s, n := r.server, r.network
	r.mu.Unlock()
	if s != "" {
		return s, n, nil
	}
	resolver := r.cfg.Resolver
	if resolver == "" {
		cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		if err != nil || len(cc.Servers) == 0 {
			return "", "", fmt.Errorf("discover update server: no resolver configured and none in /etc/resolv.conf")
		}
		resolver = cc.Servers[0] + ":" + cc.Port
	}
	var services []string
	if r.cfg.TLS != nil {
		services = append(services, "_dns-update-tls._tcp.")
	}
	services = append(services, "_dns-update._udp.")
	var errs []error
	for _, svc := range services {
		addr, target, err := DiscoverSRV(ctx, resolver, svc+r.cfg.Domain, r.cfg.Timeout)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		n := "udp"
		if strings.HasPrefix(svc, "_dns-update-tls.") {
			n = "tcp-tls"
		}
		r.mu.Lock()
		r.server, r.network, r.tlsName = addr, n, target
		r.mu.Unlock()
		r.log.Info("discovered update server", "service", svc+r.cfg.Domain, "server", addr)
		return addr, n, nil
	}
	return "", "", fmt.Errorf("discover update server: %w", errors.Join(errs...))
}

// tlsFor is the TLS configuration for server: a discovered server's
// certificate is verified against its SRV target's name (the address alone
// would need an IP SAN, which btmm-dnsd's certificate does not have).
func (r *Registrar) tlsFor(server string) *tls.Config {
	r.mu.Lock()
	name := r.tlsName
	if r.server != server {
		name = ""
	}
	r.mu.Unlock()
	return TLSFor(r.cfg.TLS, name)
}

// TLSFor returns base with ServerName set to name when base names none
// (base itself when name is empty or base is nil).
func TLSFor(base *tls.Config, name string) *tls.Config {
	if base == nil || name == "" || base.ServerName != "" {
		return base
	}
	c := base.Clone()
	c.ServerName = name
	return c
}

// netExchange sends m signed with our key and returns the answer that the
// response policy (policy.go) lets us believe: a server's unsigned answer
// to our signed UPDATE is not taken for success (unless AcceptUnsigned).
func (r *Registrar) netExchange(ctx context.Context, m *dns.Msg, server, network string) (*dns.Msg, error) {
	m.SetTsig(r.cfg.Key.Name, r.cfg.Key.Algorithm, 300, time.Now().Unix())
	req, mac, err := dns.TsigGenerateWithProvider(m, r.cfg.Key.Provider(), "", false)
	if err != nil {
		return nil, fmt.Errorf("sign update: %w", err)
	}
	c := &dns.Client{Net: network, Timeout: r.cfg.Timeout, TLSConfig: r.tlsFor(server)}
	co, err := c.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer co.Close()
	stop := context.AfterFunc(ctx, func() { co.Close() })
	defer stop()
	deadline := time.Now().Add(r.cfg.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	co.SetDeadline(deadline)
	if _, err := co.Write(req); err != nil {
		return nil, err
	}
	for {
		raw, err := co.ReadMsgHeader(nil)
		if err != nil {
			return nil, err
		}
		reply := new(dns.Msg)
		if reply.Unpack(raw) != nil || reply.Id != m.Id || !reply.Response {
			continue // not the answer to this request (UDP: stray or forged)
		}
		if err := (ResponsePolicy{AcceptUnsigned: r.cfg.AcceptUnsigned}).Check(r.cfg.Key, raw, mac); err != nil {
			return nil, err
		}
		if t := reply.IsTsig(); t != nil && t.Error == dns.RcodeBadTime {
			if st, ok := tsig.OtherTime(t); ok {
				return nil, fmt.Errorf("BADTIME: our clock is %v off the server's", time.Since(st).Round(time.Second))
			}
		}
		return reply, nil
	}
}
