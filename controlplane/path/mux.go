package path

import (
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"sync"
)

// Class is what a datagram on the keying channel carries.
type Class int

// Datagram classes.
const (
	ClassKeying Class = iota // package keying's messages (and anything else)
	ClassProbe               // PING/PONG of this package
	ClassSTUN                // RFC 8489 STUN (binding, relay allocation)
)

// stunMagicCookie is RFC 8489 §5's fixed value in bytes 4-7.
const stunMagicCookie = 0x2112A442

// Classify tells a keying-channel datagram (non-ESP marker already removed)
// apart: STUN by RFC 8489 §5 (first two bits zero, the magic cookie, a
// length that matches), probes by their first byte, everything else is
// keying's to judge.
func Classify(b []byte) Class {
	if len(b) >= 20 && b[0]&0xc0 == 0 && binary.BigEndian.Uint32(b[4:]) == stunMagicCookie &&
		int(binary.BigEndian.Uint16(b[2:]))+20 == len(b) && len(b)%4 == 0 {
		return ClassSTUN
	}
	if len(b) > 0 && b[0] == ProbeMagic {
		return ClassProbe
	}
	return ClassKeying
}

// Transport is the keying channel (keying.Transport's method set).
type Transport interface {
	WriteKeying(b []byte, addr netip.AddrPort) error
	ReadKeying(b []byte) (n int, from netip.AddrPort, err error)
}

// Mux splits one keying channel three ways. It is itself a Transport for
// package keying, whose ReadKeying sees only the ClassKeying datagrams;
// probes and STUN go to the handlers. Run is the only reader of the
// underlying transport.
type Mux struct {
	t     Transport
	rx    chan datagram
	done  chan struct{}
	once  sync.Once
	mu    sync.RWMutex
	probe func(b []byte, from netip.AddrPort)
	stun  func(b []byte, from netip.AddrPort)
	err   error
}

type datagram struct {
	b    []byte
	from netip.AddrPort
}

// NewMux wraps t.
func NewMux(t Transport) *Mux {
	return &Mux{t: t, rx: make(chan datagram, 64), done: make(chan struct{})}
}

// HandleProbes sets the function probes are given to (on Run's goroutine).
func (m *Mux) HandleProbes(f func(b []byte, from netip.AddrPort)) {
	m.mu.Lock()
	m.probe = f
	m.mu.Unlock()
}

// HandleSTUN sets the function STUN messages are given to (on Run's goroutine).
func (m *Mux) HandleSTUN(f func(b []byte, from netip.AddrPort)) {
	m.mu.Lock()
	m.stun = f
	m.mu.Unlock()
}

// Run reads the underlying transport until it fails (closed) or ctx ends,
// and dispatches. Keying datagrams that keying does not read in time are
// dropped (like a full socket buffer), never blocking probes and STUN.
func (m *Mux) Run(ctx context.Context) error {
	defer m.once.Do(func() { close(m.done) })
	buf := make([]byte, 65536)
	for {
		n, from, err := m.t.ReadKeying(buf)
		if err != nil {
			m.mu.Lock()
			m.err = err
			m.mu.Unlock()
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		b := append([]byte(nil), buf[:n]...)
		m.mu.RLock()
		probe, stun := m.probe, m.stun
		m.mu.RUnlock()
		switch Classify(b) {
		case ClassProbe:
			if probe != nil {
				probe(b, from)
			}
		case ClassSTUN:
			if stun != nil {
				stun(b, from)
			}
		default:
			select {
			case m.rx <- datagram{b, from}:
			default:
			}
		}
	}
}

// ReadKeying implements the keying Transport: the next ClassKeying datagram.
func (m *Mux) ReadKeying(b []byte) (int, netip.AddrPort, error) {
	select {
	case d := <-m.rx:
		return copy(b, d.b), d.from, nil
	case <-m.done:
		m.mu.RLock()
		defer m.mu.RUnlock()
		if m.err != nil {
			return 0, netip.AddrPort{}, m.err
		}
		return 0, netip.AddrPort{}, errors.New("path: keying channel closed")
	}
}

// WriteKeying sends b on the underlying transport (which adds the marker).
func (m *Mux) WriteKeying(b []byte, to netip.AddrPort) error { return m.t.WriteKeying(b, to) }
