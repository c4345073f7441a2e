package server

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// streamConn is one TCP or TLS connection (RFC 7766, RFC 7858). It is served
// here rather than by dns.Server so that LLQ events can be written to it
// from other goroutines and LLQs dropped when it closes.
type streamConn struct {
	c      net.Conn
	s      *Server
	client netip.Prefix // the per-client limit's key
	wmu    sync.Mutex
	hasLLQ atomic.Bool
	// llqLease is the longest LLQ lease granted on this connection; the
	// connection may stay silent that long (plus slack).
	llqLease atomic.Int64
	// events queues LLQ events for this connection's writer goroutine, so a
	// slow client never stalls event delivery to others; when it is full
	// the client is too slow and the connection is closed.
	events chan []byte
	done   chan struct{}
}

// queueEvent hands an event to the connection's writer without blocking.
func (sc *streamConn) queueEvent(msg []byte) error {
	select {
	case <-sc.done:
		return net.ErrClosed
	default:
	}
	select {
	case sc.events <- msg:
		return nil
	default:
		sc.c.Close()
		return errors.New("server: event queue full; closing slow connection")
	}
}

func (sc *streamConn) eventWriter() {
	for {
		select {
		case <-sc.done:
			return
		case m := <-sc.events:
			if err := sc.write(m); err != nil {
				sc.c.Close()
				return
			}
		}
	}
}

func (sc *streamConn) write(msg []byte) error {
	if len(msg) > dns.MaxMsgSize {
		return errors.New("server: message too large")
	}
	buf := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(buf, uint16(len(msg)))
	copy(buf[2:], msg)
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	sc.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := sc.c.Write(buf)
	return err
}

// clientKey is what the per-client connection cap counts by: the IPv4
// address, or the IPv6 /64.
func clientKey(a net.Addr) netip.Prefix {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Prefix{}
	}
	ip := ap.Addr().Unmap()
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}

// acceptLoop accepts TCP connections (TLS ones when tlsCfg is set) and
// admits them under the global and per-client caps; a connection over a
// cap is closed at once. TLS handshakes run on the connection's goroutine
// under Limits.TLSHandshakeTimeout.
func (s *Server) acceptLoop(ctx context.Context, ln net.Listener, tlsCfg *tls.Config) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		sc := &streamConn{c: c, s: s, client: clientKey(c.RemoteAddr()), events: make(chan []byte, 256), done: make(chan struct{})}
		s.mu.Lock()
		if s.closed || len(s.conns) >= s.cfg.Limits.MaxConns || s.perClient[sc.client] >= s.cfg.Limits.MaxConnsPerClient {
			over := !s.closed
			s.mu.Unlock()
			c.Close()
			if over {
				s.connsRefused.Add(1)
				s.log.Debug("connection refused: over the connection limit", "from", c.RemoteAddr().String())
			}
			continue
		}
		s.conns[sc] = struct{}{}
		s.perClient[sc.client]++
		s.wg.Add(1)
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			sc.eventWriter()
		}()
		go func() {
			defer s.wg.Done()
			s.serveStream(ctx, sc, tlsCfg)
		}()
	}
}

// idleTimeout is how long the connection may stay silent.
func (s *Server) idleTimeout(sc *streamConn) time.Duration {
	if sc.hasLLQ.Load() {
		return time.Duration(sc.llqLease.Load()) + time.Minute
	}
	return time.Duration(s.cfg.Limits.IdleTimeout)
}

func (s *Server) serveStream(ctx context.Context, sc *streamConn, tlsCfg *tls.Config) {
	defer func() {
		sc.c.Close()
		close(sc.done)
		s.llq.DropConn(sc)
		s.mu.Lock()
		delete(s.conns, sc)
		if s.perClient[sc.client]--; s.perClient[sc.client] <= 0 {
			delete(s.perClient, sc.client)
		}
		s.mu.Unlock()
	}()
	if tlsCfg != nil {
		tc := tls.Server(sc.c, tlsCfg)
		sc.c = tc
		hctx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Limits.TLSHandshakeTimeout))
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			s.log.Debug("tls handshake failed", "from", tc.RemoteAddr().String(), "err", err)
			return
		}
	}
	var hdr [2]byte
	for {
		sc.c.SetReadDeadline(time.Now().Add(s.idleTimeout(sc)))
		if _, err := io.ReadFull(sc.c, hdr[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint16(hdr[:]))
		if n < 12 || n > s.cfg.Limits.MaxMessageSize {
			return // malformed or oversized: drop the connection
		}
		sc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
		raw := make([]byte, n)
		if _, err := io.ReadFull(sc.c, raw); err != nil {
			return
		}
		s.serveRaw(raw, &streamWriter{sc: sc})
	}
}

// rawWriter is a ResponseWriter that learns the request's TSIG status.
type rawWriter interface {
	dns.ResponseWriter
	setTSIG(status error, requestMAC string)
}

// serveRaw parses one message (from any transport) and dispatches it:
// unparsable queries get FORMERR when the header is readable, responses
// other than LLQ acknowledgements are dropped, TSIG is verified on the raw
// bytes.
func (s *Server) serveRaw(raw []byte, w rawWriter) {
	var dh dns.Header
	m := new(dns.Msg)
	if err := m.Unpack(raw); err != nil {
		// Answer FORMERR if at least the header is readable.
		if len(raw) >= 12 && raw[2]&0x80 == 0 {
			dh.Id = binary.BigEndian.Uint16(raw)
			resp := &dns.Msg{MsgHdr: dns.MsgHdr{Id: dh.Id, Response: true, Opcode: int(raw[2]>>3) & 0xF,
				Rcode: dns.RcodeFormatError}}
			w.WriteMsg(resp)
		}
		return
	}
	hdr := dns.Header{Id: m.Id, Qdcount: uint16(len(m.Question)), Ancount: uint16(len(m.Answer)),
		Nscount: uint16(len(m.Ns)), Arcount: uint16(len(m.Extra))}
	hdr.Bits = uint16(m.Opcode&0xF) << 11
	if m.Response {
		hdr.Bits |= 1 << 15
	}
	switch acceptMsg(hdr) {
	case dns.MsgIgnore:
		return
	case dns.MsgReject, dns.MsgRejectNotImplemented:
		resp := new(dns.Msg)
		resp.SetRcode(m, dns.RcodeFormatError)
		if acceptMsg(hdr) == dns.MsgRejectNotImplemented {
			resp.Rcode = dns.RcodeNotImplemented
		}
		resp.Question = nil
		w.WriteMsg(resp)
		return
	}
	if t := m.IsTsig(); t != nil {
		// Verification rewrites the buffer; raw is not used afterwards.
		key, err := s.verifier.Verify(raw, t)
		if errors.Is(err, tsig.ErrRetransmission) {
			return // the first copy's answer is on its way
		}
		w.setTSIG(err, t.MAC)
		if err == nil {
			defer s.verifier.Done(key, t)
		}
	}
	s.ServeDNS(w, m)
}

// streamWriter is the dns.ResponseWriter for one message on a streamConn.
type streamWriter struct {
	sc         *streamConn
	tsigStatus error
	requestMAC string
	timersOnly bool
}

func (w *streamWriter) setTSIG(status error, mac string) { w.tsigStatus, w.requestMAC = status, mac }
func (w *streamWriter) LocalAddr() net.Addr              { return w.sc.c.LocalAddr() }
func (w *streamWriter) RemoteAddr() net.Addr             { return w.sc.c.RemoteAddr() }
func (w *streamWriter) WriteMsg(m *dns.Msg) error {
	data, err := packMsg(w.sc.s, m, w.requestMAC, w.timersOnly)
	if err != nil {
		return err
	}
	return w.sc.write(data)
}
func (w *streamWriter) Write(b []byte) (int, error) { return len(b), w.sc.write(b) }
func (w *streamWriter) Close() error                { return w.sc.c.Close() }
func (w *streamWriter) TsigStatus() error           { return w.tsigStatus }
func (w *streamWriter) TsigTimersOnly(b bool)       { w.timersOnly = b }
func (w *streamWriter) Hijack()                     {}
func (w *streamWriter) Network() string             { return "tcp" }
