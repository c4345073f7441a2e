// Package server is btmm-dnsd, the rendezvous DNS server of RFC 6281 §5: an
// authoritative server for one zone with a subdomain per user that accepts
// TSIG-signed (RFC 8945) dynamic updates (RFC 2136) with update leases
// (RFC 9664) and serves Long-Lived Queries (RFC 8764), over UDP, TCP and DNS
// over TLS (RFC 7858). It wires dns/zone, dns/store, dns/lease, dns/llq and
// dns/tsig together; handlers take a dns.ResponseWriter.
//
// # API for tests and embedding
//
//	srv, err := server.New(server.Config{
//		Zone:      "btmm.example.",
//		DataDir:   t.TempDir(),
//		Listen:    "127.0.0.1:0", // UDP and TCP on the same port
//		ListenTLS: "127.0.0.1:0", // optional, self-signed cert in DataDir/tls
//	}, logger)
//	key, err := srv.AddUser("alice", "hmac-sha256") // tsig.Key; or "hmac-md5", "hmac-sha512"
//	addrs, err := srv.Start(ctx)                    // addrs.DNS, addrs.TLS: "127.0.0.1:PORT"
//	defer srv.Close()
//
// Known keys can instead be passed in Config.Keys (tsig.NewKey("alice.btmm.example.",
// "hmac-md5") makes one).
//
// The user's key is named "alice.btmm.example." and may update and
// subscribe to names at or below "alice.btmm.example." only;
// srv.AddHost("alice", "laptop", "") makes a host's key,
// "laptop.alice.btmm.example.", which may change only the host's own names
// (dns/zone's auth.go) and read the user's zone. Queries below a user's
// domain need one of that user's keys (private records; Config.PublicRecords
// turns that off, Config.AppleCompat accepts unsigned queries and UDP LLQs
// for some users). Each user's domain is a zone of its own (SOA and NS at
// its apex); UPDATEs may name it or the parent zone. Sign with
// miekg/dns: c.TsigProvider = key.Provider() (needed for hmac-md5; the
// others also work with c.TsigSecret = map[string]string{key.Name:
// key.Base64()}) and m.SetTsig(key.Name, key.Algorithm, 300, time.Now().Unix()).
// Use dns.Client.Exchange (a fresh socket per request) or dns.TsigGenerate
// yourself: a reused dns.Conn chains the previous response's MAC into the
// next request's TSIG, which the server rejects as BADSIG.
//
// Updates: a signed UPDATE for zone "btmm.example." or "alice.btmm.example."
// (class IN SOA). With an
// EDNS0 Update-Lease option (dns.EDNS0_UL) the granted lease, clamped to
// [Config.UpdateLease.Min, Max] (default [30m, 2h]), is echoed in the
// response; without it the records get UpdateLease.Default (2h). Records
// expire at lease end; re-sending the same adds with a lease refreshes them.
// The response is sent only after the update is fsynced.
//
// LLQs: a signed query with a dns.EDNS0_LLQ option (version 1). Setup: opcode
// 1, id 0 -> challenge (opcode 1, fresh id, granted lease in [15m, 2h]); send
// the same question with opcode 1 and that id -> ACK with the current
// answers. Refresh: opcode 2 with the id and a lease (0 cancels). Events are
// unsolicited responses (QR=1, fresh message ID) from the server's port to
// the address the LLQ was set up (or last refreshed) from, with the question,
// the changed RRs in the answer section (removed RRs have TTL 0xFFFFFFFF), an
// LLQ option (opcode 3, the id, lease 0) and a TSIG signed with the LLQ's key
// (no request MAC). Over UDP the client acknowledges with a message carrying
// the same message ID and an LLQ option opcode 3 with the id (QR either way);
// without an ACK the event is resent after Config.LLQ.Retransmit (2s) and
// again after twice that; with no ACK after three transmissions the LLQ is
// deleted. Over TCP/TLS the setup needs no challenge (the first response is
// the ACK with the answers and the LLQ's id; a challenge response with that
// id gets the ACK again), events are sent once on the connection, which the
// LLQ lives on, and acknowledgements are accepted but not needed.
//
// The challenge ID is bound to the client's address: send the challenge
// response from the same socket as the request. Unsigned LLQs (unless
// AppleCompat covers the user) and LLQs on another user's names are
// REFUSED, and logged with the reason. Events for a UDP LLQ come from the
// server's UDP socket (addrs.DNS), from the address the client sent its
// setup or last refresh to (also on a wildcard listener). UDP LLQs survive a restart of the server
// with the same data directory and listen address.
//
// Other helpers: srv.Store() (inspect records), srv.LLQs() (count),
// srv.RemoveUser, srv.RemoveHost (keys, LLQs and records at once),
// srv.ReloadKeys; server.UsersOf(cfg) manages keys without a running server
// and server.Control talks to a running one through DataDir/control.sock
// (the adduser/addhost/delhost/deluser commands). docs/dnsd.md has the
// config file format.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/btmm/btmm/dns/lease"
	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/store"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/dns/zone"
	"github.com/miekg/dns"
)

// Addrs are the bound listener addresses ("" when not listening).
type Addrs struct {
	DNS string // UDP and TCP
	TLS string
}

// Server is a running btmm-dnsd.
type Server struct {
	cfg      Config
	log      *slog.Logger
	users    *Users
	keys     *tsig.Keyring
	verifier *tsig.Verifier
	zone     *zone.Zone
	store    store.Store
	llq      *llq.Table
	rate     *rateLimiter
	refuse   refuseLimiter
	hosts    hostIndex // keys.go

	// life ends when the server stops (Close, or the end of Start's
	// context), so request handlers' store writes end with it.
	life    context.Context
	endLife context.CancelFunc

	mu      sync.Mutex
	started bool
	closed  bool
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	udp     *net.UDPConn
	lns     []net.Listener
	conns   map[*streamConn]struct{}
	// perClient counts conns by clientKey.
	perClient    map[netip.Prefix]int
	connsRefused atomic.Int64
	ports        zone.Ports
	tlsCfg       *tls.Config
	tlsLn        net.Listener // the DoT listener among lns
}

// New opens the data directory (store and user keys) and prepares a server.
// Call Start to listen.
func New(cfg Config, log *slog.Logger) (*Server, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: log, keys: tsig.NewKeyring(), conns: map[*streamConn]struct{}{},
		perClient: map[netip.Prefix]int{}}
	s.verifier = tsig.NewVerifier(s.keys, time.Duration(cfg.TSIGFudge), cfg.Now)
	s.life, s.endLife = context.WithCancel(context.Background())
	s.users = UsersOf(cfg)
	var addrs []netip.Addr
	for _, a := range cfg.ServerAddrs {
		addrs = append(addrs, netip.MustParseAddr(a))
	}
	var relays []zone.Relay
	for _, r := range cfg.Relays {
		zr := zone.Relay{Name: r.Name, Port: r.Port, TLSPort: r.TLSPort}
		for _, a := range r.Addrs {
			zr.Addrs = append(zr.Addrs, netip.MustParseAddr(a))
		}
		relays = append(relays, zr)
	}
	z, err := zone.New(zone.Zone{Origin: cfg.Zone, ServerName: cfg.ServerName, ServerAddr: addrs,
		IsUser: s.isUser, Hosts: s.hostsOf, Ports: zone.Ports{}, Relays: relays})
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	s.zone = z
	for _, k := range cfg.Keys {
		if err := s.users.Install(k); err != nil {
			return nil, err
		}
	}
	if err := s.ReloadKeys(); err != nil {
		return nil, err
	}
	s.keys.Miss = s.loadKey
	st, err := s.openStore()
	if err != nil {
		return nil, err
	}
	s.store = st
	s.rate = newRateLimiter(cfg.Limits.UpdatesPerSecond, cfg.Limits.UpdateBurst)
	s.llq = llq.NewTable(llq.Config{
		MinLease: time.Duration(cfg.LLQ.MinLease), MaxLease: time.Duration(cfg.LLQ.MaxLease),
		Retransmit: time.Duration(cfg.LLQ.Retransmit), Transmissions: cfg.LLQ.Transmissions,
		MaxPerKey: cfg.LLQ.MaxPerKey, MaxTotal: cfg.LLQ.MaxTotal,
		Answer: s.answerLLQ, Send: newEventSender(s), Log: log, Now: cfg.Now, OnChangeSent: cfg.OnLLQChange,
		Persist: func(id uint64, data []byte) {
			k := "llq/" + strconv.FormatUint(id, 16)
			var err error
			if data == nil {
				err = st.DeleteMeta(k)
			} else {
				err = st.PutMeta(k, data)
			}
			if err != nil {
				log.Warn("persist llq", "err", err)
			}
		},
	})
	return s, nil
}

// Store returns the server's store (for inspection in tests).
func (s *Server) Store() store.Store { return s.store }

// LLQs returns the number of established LLQs.
func (s *Server) LLQs() int { return s.llq.Len() }

// Start binds the listeners and starts serving; it returns the bound
// addresses. The server stops when ctx ends or Close is called.
func (s *Server) Start(ctx context.Context) (Addrs, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		return Addrs{}, errors.New("server: start: already started or closed")
	}
	s.started = true
	ctx, s.cancel = context.WithCancel(ctx)
	context.AfterFunc(ctx, s.endLife)
	var addrs Addrs
	fail := func(err error) (Addrs, error) {
		s.closeListenersLocked()
		return Addrs{}, err
	}
	if s.cfg.Listen != "" {
		pc, ln, err := listenSamePort(s.cfg.Listen)
		if err != nil {
			return fail(fmt.Errorf("server: listen %s: %w", s.cfg.Listen, err))
		}
		s.udp = pc.(*net.UDPConn)
		s.lns = append(s.lns, ln)
		addrs.DNS = pc.LocalAddr().String()
		port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
		if s.cfg.AdvertiseDNSPort != 0 {
			port = s.cfg.AdvertiseDNSPort
		}
		s.ports.UpdateUDP, s.ports.LLQUDP = port, port
	}
	if s.cfg.ListenTLS != "" {
		cert, err := loadOrCreateCert(s.cfg.TLSCert, s.cfg.TLSKey, filepath.Join(s.cfg.DataDir, "tls"), s.zone.ServerName, s.cfg.Now())
		if err != nil {
			return fail(err)
		}
		s.tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert},
			MinVersion: tls.VersionTLS12, NextProtos: []string{"dot"}}
		ln, err := net.Listen("tcp", s.cfg.ListenTLS)
		if err != nil {
			return fail(fmt.Errorf("server: listen tls %s: %w", s.cfg.ListenTLS, err))
		}
		s.lns = append(s.lns, ln)
		s.tlsLn = ln
		addrs.TLS = ln.Addr().String()
		port := uint16(ln.Addr().(*net.TCPAddr).Port)
		if s.cfg.AdvertiseTLSPort != 0 {
			port = s.cfg.AdvertiseTLSPort
		}
		s.ports.UpdateTLS, s.ports.LLQTLS = port, port
	}
	s.zone.Ports = s.ports

	// Restore persisted UDP LLQs.
	if m, err := s.store.Meta("llq/"); err == nil {
		var data [][]byte
		for _, v := range m {
			data = append(data, v)
		}
		if n := s.llq.Restore(data); n > 0 {
			s.log.Info("restored LLQs", "count", n)
		}
	}
	// Store changes drive LLQ events; leases drive expiry.
	ch, _ := s.store.Watch(ctx)
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		for c := range ch {
			s.llq.Changed(c)
		}
	}()
	exp := &lease.Expirer{Store: s.store, Log: s.log, Now: s.cfg.Now}
	go func() {
		defer s.wg.Done()
		if l, ok := s.store.(store.Leader); ok {
			// Replicas: one elected expirer, fenced by its election.
			l.Lead(ctx, func(ctx context.Context) { exp.Run(ctx) })
			return
		}
		exp.Run(ctx)
	}()
	if r, ok := s.store.(store.Registry); ok {
		self := store.Server{Name: s.zone.ServerName, Addrs: s.cfg.ServerAddrs, DNS: s.ports.UpdateUDP, TLS: s.ports.UpdateTLS}
		s.zone.Replicas = r.Servers
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			r.Register(ctx, self)
		}()
	}

	if s.udp != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveUDP(ctx, s.udp)
		}()
	}
	for _, ln := range s.lns {
		var tlsCfg *tls.Config
		if ln == s.tlsLn {
			tlsCfg = s.tlsCfg
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.acceptLoop(ctx, ln, tlsCfg)
		}()
	}
	go func() {
		<-ctx.Done()
		s.Close()
	}()
	s.logCompat()
	if err := s.startControl(); err != nil {
		s.log.Warn("no control socket: admin commands need SIGHUP to take effect", "err", err)
	}
	s.log.Info("btmm-dnsd serving", "zone", s.zone.Origin, "dns", addrs.DNS, "tls", addrs.TLS)
	return addrs, nil
}

// listenSamePort binds UDP and then TCP on the same port (retrying when
// port 0 picked a UDP port whose TCP twin is taken).
func listenSamePort(addr string) (net.PacketConn, net.Listener, error) {
	var lastErr error
	for range 20 {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, nil, err
		}
		host, _, _ := net.SplitHostPort(addr)
		port := pc.LocalAddr().(*net.UDPAddr).Port
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err == nil {
			// Room for bursts (e.g. many LLQ refreshes); capped by net.core.rmem_max.
			pc.(*net.UDPConn).SetReadBuffer(4 << 20)
			return pc, ln, nil
		}
		pc.Close()
		lastErr = err
		if _, p, _ := net.SplitHostPort(addr); p != "0" {
			break
		}
	}
	return nil, nil, lastErr
}

func (s *Server) closeListenersLocked() {
	if s.udp != nil {
		s.udp.Close()
	}
	for _, ln := range s.lns {
		ln.Close()
	}
}

// Close stops the server and waits for its goroutines; state stays in the
// data directory.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	if s.cancel != nil {
		s.cancel()
	}
	s.endLife()
	s.closeListenersLocked()
	for c := range s.conns {
		c.c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.llq.Close()
	return s.store.Close()
}

// acceptMsg admits queries, updates and (possible LLQ event ACKs) responses.
func acceptMsg(dh dns.Header) dns.MsgAcceptAction {
	opcode := int(dh.Bits>>11) & 0xF
	if opcode != dns.OpcodeQuery && opcode != dns.OpcodeUpdate {
		if dh.Bits&(1<<15) != 0 {
			return dns.MsgIgnore
		}
		return dns.MsgRejectNotImplemented
	}
	if dh.Qdcount != 1 {
		if dh.Bits&(1<<15) != 0 {
			return dns.MsgIgnore
		}
		return dns.MsgReject
	}
	if int(dh.Ancount)+int(dh.Nscount)+int(dh.Arcount) > 1024 {
		return dns.MsgReject
	}
	return dns.MsgAccept
}

// authInfo is what TSIG verification established about a request.
type authInfo struct {
	signed bool
	key    string // key name, when verified
	user   string // the key's user
	host   string // the key's host ("" for the user's own key)
	tsig   *dns.TSIG
	err    error // verification failure
}

func (s *Server) auth(w dns.ResponseWriter, r *dns.Msg) authInfo {
	t := r.IsTsig()
	if t == nil {
		return authInfo{}
	}
	a := authInfo{signed: true, tsig: t}
	if err := w.TsigStatus(); err != nil {
		a.err = err
		return a
	}
	a.key = dns.CanonicalName(t.Hdr.Name)
	a.user, a.host, _ = s.users.Principal(a.key)
	return a
}

// tsigError answers a request whose TSIG was not accepted (RFC 8945 §5.2,
// §5.3.2): NOTAUTH with the TSIG error (BADTIME and BADTRUNC signed, BADTIME
// with the server's time in Other Data), or an unsigned FORMERR.
func (s *Server) tsigError(w dns.ResponseWriter, r *dns.Msg, a authInfo) {
	var ve *tsig.VerifyError
	if !errors.As(a.err, &ve) {
		ve = &tsig.VerifyError{Code: dns.RcodeBadSig, Rcode: dns.RcodeNotAuth, Reason: a.err.Error(), ServerTime: s.cfg.Now()}
	}
	resp := new(dns.Msg)
	resp.SetRcode(r, ve.Rcode)
	if ve.Code != 0 {
		resp.Extra = append(resp.Extra, tsig.ErrorTSIG(a.tsig, resp.Id, ve, time.Duration(s.cfg.TSIGFudge)))
	}
	s.refusedLog("tsig", w, "key", a.tsig.Hdr.Name, "reason", ve.Error())
	if err := w.WriteMsg(resp); err != nil {
		s.log.Debug("write tsig error", "err", err)
	}
}

// reply finishes resp (EDNS, TSIG) and writes it.
func (s *Server) reply(w dns.ResponseWriter, r, resp *dns.Msg, a authInfo) {
	if opt := r.IsEdns0(); opt != nil && resp.IsEdns0() == nil {
		resp.SetEdns0(4096, false)
	}
	if a.key != "" {
		resp.SetTsig(a.tsig.Hdr.Name, a.tsig.Algorithm, s.fudge(), s.cfg.Now().Unix())
	}
	if err := w.WriteMsg(resp); err != nil {
		s.log.Debug("write response", "err", err)
	}
}

// ServeDNS implements dns.Handler.
func (s *Server) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	if r.Response {
		// Only LLQ event acknowledgements arrive as responses.
		if o, ok := llq.Option(r); ok && o.Opcode == llq.OpEvent {
			s.llq.Handle(r, s.peer(w), "")
		}
		return
	}
	a := s.auth(w, r)
	if a.err != nil {
		s.tsigError(w, r, a)
		return
	}
	switch r.Opcode {
	case dns.OpcodeUpdate:
		if s.cfg.OnUpdate == nil {
			s.serveUpdate(w, r, a)
			return
		}
		start, rw := time.Now(), &rcodeWriter{ResponseWriter: w, rcode: -1}
		s.serveUpdate(rw, r, a)
		s.cfg.OnUpdate(rw.rcode, time.Since(start))
	case dns.OpcodeQuery:
		if _, ok := llq.Option(r); ok {
			s.serveLLQ(w, r, a)
			return
		}
		s.serveQuery(w, r, a)
	default:
		resp := new(dns.Msg)
		resp.SetRcode(r, dns.RcodeNotImplemented)
		s.reply(w, r, resp, a)
	}
}

func (s *Server) serveQuery(w dns.ResponseWriter, r *dns.Msg, a authInfo) {
	resp := new(dns.Msg)
	resp.SetReply(r)
	if len(r.Question) != 1 {
		resp.Rcode = dns.RcodeFormatError
		s.reply(w, r, resp, a)
		return
	}
	q := r.Question[0]
	if q.Qtype == dns.TypeAXFR || q.Qtype == dns.TypeIXFR {
		resp.Rcode = dns.RcodeRefused
		s.refusedLog("query", w, "name", q.Name, "reason", "zone transfer")
		s.reply(w, r, resp, a)
		return
	}
	reason, hideSOA := s.queryAccess(q, a)
	switch {
	case reason != "":
		resp.Rcode = dns.RcodeRefused
		s.refusedLog("query", w, "name", q.Name, "type", dns.Type(q.Qtype).String(), "key", a.key, "reason", reason)
		s.reply(w, r, resp, a)
		return
	case hideSOA:
		s.zoneNoData(q, resp)
		s.reply(w, r, resp, a)
		return
	}
	now := s.cfg.Now()
	s.store.Read(func(v store.View) { s.zone.Answer(v, q, now, resp) })
	truncateUDP(w, r, resp)
	s.reply(w, r, resp, a)
}

// truncateUDP fits a UDP response into the requester's buffer size (TC set
// when records had to go), leaving room for a TSIG.
func truncateUDP(w dns.ResponseWriter, r, resp *dns.Msg) {
	if _, isUDP := w.RemoteAddr().(*net.UDPAddr); !isUDP {
		return
	}
	size := 512
	if opt := r.IsEdns0(); opt != nil {
		size = max(int(opt.UDPSize()), 512)
	}
	if r.IsTsig() != nil {
		size -= 200
	}
	resp.Truncate(size)
}

func (s *Server) answerLLQ(q dns.Question) ([]dns.RR, uint64) {
	resp := new(dns.Msg)
	now := s.cfg.Now()
	var rev uint64
	s.store.Read(func(v store.View) {
		s.zone.Answer(v, q, now, resp)
		rev = v.Rev()
	})
	return resp.Answer, rev
}

func (s *Server) peer(w dns.ResponseWriter) llq.Peer {
	if sw, ok := w.(*streamWriter); ok {
		return llq.Peer{Net: "tcp", Addr: sw.sc.c.RemoteAddr().String(), Conn: sw.sc}
	}
	p := llq.Peer{Net: "udp", Addr: w.RemoteAddr().String()}
	if uw, ok := w.(*udpWriter); ok {
		p.Reply = uw.sess
		if uw.sess.local != nil {
			p.Local = uw.sess.local.String() // persisted: a restored LLQ's events leave from it too
		}
	}
	return p
}

func (s *Server) serveLLQ(w dns.ResponseWriter, r *dns.Msg, a authInfo) {
	o, _ := llq.Option(r)
	if o.Opcode == llq.OpEvent {
		s.llq.Handle(r, s.peer(w), a.key)
		return
	}
	deny := func(rcode int) {
		resp := new(dns.Msg)
		resp.SetRcode(r, rcode)
		s.reply(w, r, resp, a)
	}
	if len(r.Question) != 1 {
		deny(dns.RcodeFormatError)
		return
	}
	q := r.Question[0]
	key, reason := s.llqAccess(w, q, a)
	if reason != "" {
		s.refusedLog("llq", w, "name", q.Name, "key", a.key, "reason", reason)
		deny(dns.RcodeRefused)
		return
	}
	resp, err := s.llq.Handle(r, s.peer(w), key)
	if err != nil || resp == nil {
		return
	}
	if sw, ok := w.(*streamWriter); ok {
		if ro, ok := llq.Option(resp); ok && ro.Error == llq.ErrNoError && ro.LeaseLife > 0 {
			// Silence is allowed as long as the longest lease granted here.
			l := int64(time.Duration(ro.LeaseLife) * time.Second)
			for {
				old := sw.sc.llqLease.Load()
				if l <= old || sw.sc.llqLease.CompareAndSwap(old, l) {
					break
				}
			}
			sw.sc.hasLLQ.Store(true)
		}
	}
	truncateUDP(w, r, resp)
	s.reply(w, r, resp, a)
}

func (s *Server) serveUpdate(w dns.ResponseWriter, r *dns.Msg, a authInfo) {
	resp := new(dns.Msg)
	resp.SetReply(r)
	fail := func(err error) {
		resp.Rcode = zone.Rcode(err)
		s.refusedLog("update", w, "key", a.key, "reason", err.Error())
		s.reply(w, r, resp, a)
	}
	if a.key == "" {
		fail(&zone.RcodeError{Rcode: dns.RcodeRefused, Reason: "unsigned update"})
		return
	}
	if len(r.Answer)+len(r.Ns) > s.cfg.Limits.MaxUpdateRecords {
		fail(&zone.RcodeError{Rcode: dns.RcodeRefused, Reason: "too many records"})
		return
	}
	now := s.cfg.Now()
	if !s.rate.allow(a.key, now) {
		fail(&zone.RcodeError{Rcode: dns.RcodeRefused, Reason: "update rate limit"})
		return
	}
	granted, echo := s.cfg.leaseBounds().Grant(r)
	req := zone.Request{User: a.user, Host: a.host, KeyName: a.key, Lease: granted, Now: now}
	if err := s.zone.CheckUpdate(r, req); err != nil {
		fail(err)
		return
	}
	ctx, cancel := context.WithTimeout(s.life, 10*time.Second)
	defer cancel()
	if _, err := s.store.Update(ctx, s.zone.Update(r, req)); err != nil {
		var re *zone.RcodeError
		if !errors.As(err, &re) {
			s.log.Error("update failed", "key", a.key, "err", err)
		}
		fail(err)
		return
	}
	if echo != nil {
		resp.SetEdns0(4096, false)
		opt := resp.IsEdns0()
		opt.Option = append(opt.Option, echo)
	}
	s.reply(w, r, resp, a)
}

// rateLimiter is a token bucket per key.
type rateLimiter struct {
	mu      sync.Mutex
	rate    float64
	burst   float64
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newRateLimiter(rate float64, burst int) *rateLimiter {
	return &rateLimiter{rate: rate, burst: float64(burst), buckets: map[string]*bucket{}}
}

func (l *rateLimiter) allow(key string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[strings.ToLower(key)]
	if b == nil {
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[strings.ToLower(key)] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// rcodeWriter records the rcode of the answer written through it (-1: none).
type rcodeWriter struct {
	dns.ResponseWriter
	rcode int
}

func (w *rcodeWriter) WriteMsg(m *dns.Msg) error {
	w.rcode = m.Rcode
	return w.ResponseWriter.WriteMsg(m)
}
