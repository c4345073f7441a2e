package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// A stream closes when it holds no allocation and no bind this long after
// it opened (a connection that never authenticates costs little for long).
const streamIdle = 30 * time.Second

// streamHandshakeTimeout bounds a stream's TLS handshake.
const streamHandshakeTimeout = 10 * time.Second

// streamWriteTimeout bounds one write to a stream: a host that stops
// reading is dropped rather than holding the relay's queue.
const streamWriteTimeout = 30 * time.Second

// stream is one host attached by TLS (relay-tcp).
type stream struct {
	conn   net.Conn
	src    netip.AddrPort // its source in the relay's tables (streamSource)
	remote netip.AddrPort // the TCP peer, for logs, rate limits and XOR-MAPPED-ADDRESS
	opened time.Time
	q      chan []byte
	done   chan struct{}
	once   sync.Once
}

// send queues a frame; a full queue drops it (counted), as a full socket
// buffer drops a UDP datagram.
func (st *stream) send(s *Server, port uint16, datagram []byte) {
	f, err := AppendFrame(make([]byte, 0, len(datagram)+4), port, datagram)
	if err != nil {
		s.count(func(x *Stats) { x.Dropped++ })
		return
	}
	select {
	case st.q <- f:
		s.count(func(x *Stats) { x.StreamFrames++ })
	case <-st.done:
	default:
		s.count(func(x *Stats) { x.StreamDropped++ })
	}
}

func (st *stream) close() {
	st.once.Do(func() {
		close(st.done)
		st.conn.Close()
	})
}

// mapped is a source as a host's XOR-MAPPED-ADDRESS shows it: a stream's
// TCP peer address, or the UDP source itself.
func (s *Server) mapped(from netip.AddrPort) netip.AddrPort {
	if !isStream(from) {
		return from
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[from]; st != nil {
		return st.remote
	}
	return netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
}

// streamUsedLocked reports whether a stream holds an allocation or a bind.
func (s *Server) streamUsedLocked(src netip.AddrPort) bool {
	for _, a := range s.allocs {
		if a.from == src {
			return true
		}
	}
	for f := range s.binds {
		if f.From == src {
			return true
		}
	}
	return false
}

func (s *Server) acceptLoop(l net.Listener) {
	tcfg := s.cfg.TLS.Clone()
	tcfg.NextProtos = []string{StreamALPN}
	tcfg.MinVersion = max(tcfg.MinVersion, tls.VersionTLS13)
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Warn("stream accept", "err", err)
			time.Sleep(100 * time.Millisecond) // EMFILE and friends: do not spin
			continue
		}
		s.mu.Lock()
		full := s.closed || len(s.streams) >= s.cfg.MaxStreams
		s.mu.Unlock()
		if full {
			s.count(func(st *Stats) { st.Dropped++ })
			c.Close()
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveStream(tls.Server(c, tcfg))
		}()
	}
}

// serveStream runs one stream: the TLS handshake (ALPN StreamALPN), then
// frames in both directions until either side closes.
func (s *Server) serveStream(c *tls.Conn) {
	defer c.Close()
	// The handshake ends at its deadline or when the server closes,
	// whichever comes first (a stalled client does not hold Close).
	ctx, cancel := context.WithTimeout(s.ctx, streamHandshakeTimeout)
	defer cancel()
	c.SetDeadline(time.Now().Add(streamHandshakeTimeout))
	s.nhandshake.Add(1)
	err := c.HandshakeContext(ctx)
	s.nhandshake.Add(-1)
	if err != nil {
		s.log.Debug("stream handshake", "remote", c.RemoteAddr(), "err", err)
		s.count(func(st *Stats) { st.Dropped++ })
		return
	}
	if c.ConnectionState().NegotiatedProtocol != StreamALPN {
		s.log.Debug("stream without ALPN "+StreamALPN, "remote", c.RemoteAddr())
		s.count(func(st *Stats) { st.Dropped++ })
		return
	}
	c.SetDeadline(time.Time{})
	remote := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.nstream++
	st := &stream{conn: c, src: streamSource(s.nstream), remote: remote, opened: time.Now(),
		q: make(chan []byte, s.cfg.StreamQueue), done: make(chan struct{})}
	s.streams[st.src] = st
	s.mu.Unlock()
	s.log.Info("stream opened", "remote", remote)
	defer func() {
		st.close()
		s.mu.Lock()
		delete(s.streams, st.src)
		for f := range s.binds {
			if f.From == st.src {
				delete(s.binds, f)
			}
		}
		s.mu.Unlock()
		s.syncFlows()
		s.log.Info("stream closed", "remote", remote)
	}()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer st.close()
		for {
			select {
			case f := <-st.q:
				c.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
				if _, err := c.Write(f); err != nil {
					return
				}
			case <-st.done:
				return
			}
		}
	}()
	br := bufio.NewReaderSize(c, 65536)
	buf := make([]byte, MaxFrame)
	for {
		port, d, err := ReadFrame(br, buf)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Debug("stream read", "remote", remote, "err", err)
			}
			return
		}
		in := uint16(0) // the relay's control
		if port >= s.cfg.PortMin && port <= s.cfg.PortMax {
			in = port
		}
		s.handle(in, d, st.src, remote.Addr(), func(resp []byte) { st.send(s, port, resp) })
	}
}

// handshaking is the number of stream TLS handshakes in progress.
func (s *Server) handshaking() int { return int(s.nhandshake.Load()) }
