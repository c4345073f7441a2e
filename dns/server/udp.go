package server

import (
	"context"
	"errors"
	"net"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// UDP is served here rather than by dns.Server so that LLQ events leave
// from the address the client talked to (the request's UDP session, also on
// a wildcard listener), and so that concurrent handlers are bounded.

const maxUDPHandlers = 256

func setUDPSocketOptions(conn *net.UDPConn) {
	// Destination address and interface of each datagram, to answer from it.
	ipv6.NewPacketConn(conn).SetControlMessage(ipv6.FlagDst|ipv6.FlagInterface, true)
	ipv4.NewPacketConn(conn).SetControlMessage(ipv4.FlagDst|ipv4.FlagInterface, true)
}

// udpSession is where a UDP request came from and the control message that
// makes a reply (or an LLQ event) leave from the address the request was
// sent to, also on a wildcard listener.
type udpSession struct {
	raddr *net.UDPAddr
	oob   []byte // IP_PKTINFO / IPV6_PKTINFO with the request's destination as source; nil: none
	local net.IP // the request's destination (nil: unknown)
}

// oobSize holds the control messages setUDPSocketOptions asks for.
var oobSize = max(len(ipv4.NewControlMessage(ipv4.FlagDst|ipv4.FlagInterface)),
	len(ipv6.NewControlMessage(ipv6.FlagDst|ipv6.FlagInterface)))

func newUDPSession(raddr *net.UDPAddr, oob []byte) *udpSession {
	sess := &udpSession{raddr: raddr}
	// As miekg/dns's session does: the destination, IPv6 first.
	var dst net.IP
	if cm6 := new(ipv6.ControlMessage); cm6.Parse(oob) == nil && cm6.Dst != nil {
		dst = cm6.Dst
	} else if cm4 := new(ipv4.ControlMessage); cm4.Parse(oob) == nil && cm4.Dst != nil {
		dst = cm4.Dst
	}
	sess.local, sess.oob = dst, srcOOB(dst)
	return sess
}

// srcOOB is the control message that makes a datagram leave from src (nil
// for none).
func srcOOB(src net.IP) []byte {
	switch {
	case src == nil:
		return nil
	case src.To4() == nil:
		return (&ipv6.ControlMessage{Src: src}).Marshal()
	default:
		return (&ipv4.ControlMessage{Src: src}).Marshal()
	}
}

func (sess *udpSession) write(conn *net.UDPConn, b []byte) (int, error) {
	n, _, err := conn.WriteMsgUDP(b, sess.oob, sess.raddr)
	return n, err
}

func (s *Server) serveUDP(ctx context.Context, conn *net.UDPConn) {
	setUDPSocketOptions(conn)
	sem := make(chan struct{}, maxUDPHandlers)
	max := s.cfg.Limits.MaxMessageSize
	// One read buffer, reused: each datagram is copied out at its size (an
	// LLQ acknowledgement is ~100 octets; a fresh max-size buffer per
	// datagram cost more than handling it).
	buf := make([]byte, max+1)
	oob := make([]byte, oobSize)
	for {
		n, oobn, _, raddr, err := conn.ReadMsgUDP(buf, oob)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		if n < 12 || n > max {
			continue // runt or over the size limit: drop
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		msg := append([]byte(nil), buf[:n]...)
		sess := newUDPSession(raddr, oob[:oobn])
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-sem }()
			s.serveRaw(msg, &udpWriter{s: s, conn: conn, sess: sess})
		}()
	}
}

// udpWriter is the dns.ResponseWriter for one UDP request.
type udpWriter struct {
	s          *Server
	conn       *net.UDPConn
	sess       *udpSession
	tsigStatus error
	requestMAC string
	timersOnly bool
}

func (w *udpWriter) setTSIG(status error, mac string) { w.tsigStatus, w.requestMAC = status, mac }
func (w *udpWriter) LocalAddr() net.Addr              { return w.conn.LocalAddr() }
func (w *udpWriter) RemoteAddr() net.Addr             { return w.sess.raddr }
func (w *udpWriter) WriteMsg(m *dns.Msg) error {
	data, err := packMsg(w.s, m, w.requestMAC, w.timersOnly)
	if err != nil {
		return err
	}
	_, err = w.sess.write(w.conn, data)
	return err
}
func (w *udpWriter) Write(b []byte) (int, error) { return w.sess.write(w.conn, b) }
func (w *udpWriter) Close() error                { return nil }
func (w *udpWriter) TsigStatus() error           { return w.tsigStatus }
func (w *udpWriter) TsigTimersOnly(b bool)       { w.timersOnly = b }
func (w *udpWriter) Hijack()                     {}

// packMsg packs m, signing it when it carries a TSIG RR.
func packMsg(s *Server, m *dns.Msg, requestMAC string, timersOnly bool) ([]byte, error) {
	if m.IsTsig() != nil {
		data, _, err := dns.TsigGenerateWithProvider(m, s.keys, requestMAC, timersOnly)
		return data, err
	}
	return m.Pack()
}
