package keying

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/btmm/btmm/controlplane"
)

// memNet is an in-memory datagram network for state-machine tests (it works
// inside testing/synctest bubbles, where real sockets would not).
type memNet struct {
	mu  sync.Mutex
	eps map[netip.AddrPort]*memEP
	// tap sees every datagram; it may rewrite it or return nil to drop it.
	tap func(from, to netip.AddrPort, b []byte) []byte
}

type memPkt struct {
	b    []byte
	from netip.AddrPort
}

type memEP struct {
	n      *memNet
	addr   netip.AddrPort
	ch     chan memPkt
	closed chan struct{}
	once   sync.Once
}

func newMemNet() *memNet { return &memNet{eps: map[netip.AddrPort]*memEP{}} }

func (n *memNet) endpoint(addr string) *memEP {
	n.mu.Lock()
	defer n.mu.Unlock()
	ep := &memEP{n: n, addr: netip.MustParseAddrPort(addr), ch: make(chan memPkt, 64), closed: make(chan struct{})}
	n.eps[ep.addr] = ep
	return ep
}

// inject delivers b to 'to' as if sent from 'from' (an attacker's datagram).
func (n *memNet) inject(from, to netip.AddrPort, b []byte) {
	n.mu.Lock()
	ep := n.eps[to]
	n.mu.Unlock()
	if ep != nil {
		select {
		case ep.ch <- memPkt{bytes.Clone(b), from}:
		default:
		}
	}
}

func (e *memEP) WriteKeying(b []byte, to netip.AddrPort) error {
	b = bytes.Clone(b)
	e.n.mu.Lock()
	tap := e.n.tap
	dst := e.n.eps[to]
	from := e.addr
	e.n.mu.Unlock()
	if tap != nil {
		if b = tap(from, to, b); b == nil {
			return nil
		}
	}
	if dst == nil {
		return nil // nobody there: lost, like UDP
	}
	select {
	case dst.ch <- memPkt{b, from}:
	default:
	}
	return nil
}

// setTap replaces the tap while the network is in use.
func (n *memNet) setTap(f func(from, to netip.AddrPort, b []byte) []byte) {
	n.mu.Lock()
	n.tap = f
	n.mu.Unlock()
}

// move gives e a new address (the host moved): it sends from it and
// receives on it from now on.
func (n *memNet) move(e *memEP, to netip.AddrPort) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.eps, e.addr)
	e.addr = to
	n.eps[to] = e
}

func (e *memEP) ReadKeying(b []byte) (int, netip.AddrPort, error) {
	select {
	case p := <-e.ch:
		return copy(b, p.b), p.from, nil
	case <-e.closed:
		return 0, netip.AddrPort{}, errors.New("closed")
	}
}

func (e *memEP) Close() { e.once.Do(func() { close(e.closed) }) }

// testMaterial is an exchange's session material made from secret and two
// stand-ins for the ephemeral secrets (for tests that need keys, not an
// exchange).
func testMaterial(secret, dh, kem []byte) material {
	_, session := schedule(secret, bytes.Clone(dh), bytes.Clone(kem), []byte("INIT"))
	return session([]byte("RESP"))
}

// recorder is a recording Installer: it keeps what the dataplane would hold
// and every call, and can be told to fail.
type recorder struct {
	mu    sync.Mutex
	name  string
	peers map[netip.Addr]controlplane.Peer
	calls []string
	keys  [][]byte
	fail  error
	// onChange runs (under no lock) after every successful call.
	onChange func()
}

func newRecorder(name string) *recorder {
	return &recorder{name: name, peers: map[netip.Addr]controlplane.Peer{}}
}

func (r *recorder) Install(_ context.Context, p controlplane.Peer) error {
	r.mu.Lock()
	if r.fail != nil {
		r.mu.Unlock()
		return r.fail
	}
	st := controlplane.State{Local: controlplane.Local{ULA: netip.MustParseAddr("fd00::ffff"), Port: 4500},
		Peers: []controlplane.Peer{p}}
	if p.Outer.Addr().Is4() {
		if err := st.Validate(); err != nil {
			r.mu.Unlock()
			return fmt.Errorf("recorder: invalid peer: %w", err)
		}
	}
	p.PrevIn = slices.Clone(p.PrevIn)
	r.peers[p.ULA] = p
	r.keys = append(r.keys, p.Out.Key, p.In.Key)
	var prev []string
	for _, s := range p.PrevIn {
		prev = append(prev, fmt.Sprintf("%08x", s.SPI))
	}
	r.calls = append(r.calls, fmt.Sprintf("install %v out=%08x in=%08x prev=%v", p.ULA, p.Out.SPI, p.In.SPI, prev))
	f := r.onChange
	r.mu.Unlock()
	if f != nil {
		f()
	}
	return nil
}

func (r *recorder) Remove(_ context.Context, ula netip.Addr) error {
	r.mu.Lock()
	delete(r.peers, ula)
	r.calls = append(r.calls, fmt.Sprintf("remove %v", ula))
	f := r.onChange
	r.mu.Unlock()
	if f != nil {
		f()
	}
	return nil
}

func (r *recorder) peer(ula netip.Addr) (controlplane.Peer, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.peers[ula]
	return p, ok
}

func (r *recorder) Calls() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

// accepts reports whether an SA sent with out is accepted by the receiving
// peer entry p (its In or one of its PrevIn, with the same key).
func accepts(p controlplane.Peer, out controlplane.SA) bool {
	for _, in := range append([]controlplane.SA{p.In}, p.PrevIn...) {
		if in.SPI == out.SPI && in.Cipher == out.Cipher && bytes.Equal(in.Key, out.Key) {
			return true
		}
	}
	return false
}

// pairOK checks that a's and b's views of each other are one SA pair.
func pairOK(t testing.TB, a, b controlplane.Peer) {
	t.Helper()
	if a.Out.SPI != b.In.SPI || !bytes.Equal(a.Out.Key, b.In.Key) || a.Out.Cipher != b.In.Cipher {
		t.Errorf("a.Out %v != b.In %v (or keys differ)", a.Out, b.In)
	}
	if b.Out.SPI != a.In.SPI || !bytes.Equal(b.Out.Key, a.In.Key) || b.Out.Cipher != a.In.Cipher {
		t.Errorf("b.Out %v != a.In %v (or keys differ)", b.Out, a.In)
	}
	if bytes.Equal(a.Out.Key, a.In.Key) {
		t.Errorf("both directions use the same key")
	}
}

// testLogger logs through t and fails the test if a line ever shows key
// material: every key the recorder sees is checked against the log at the end.
func testLogger(t testing.TB) (*slog.Logger, *logWriter) {
	w := &logWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.t = nil; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug})), w
}

// noKeysLogged fails t if any key a recorder saw appears in the log, raw or
// in hex, or in an error string.
func noKeysLogged(t testing.TB, w *logWriter, recs ...*recorder) {
	t.Helper()
	w.mu.Lock()
	logs := w.buf.String()
	w.mu.Unlock()
	for _, r := range recs {
		r.mu.Lock()
		for _, k := range r.keys {
			if strings.Contains(logs, string(k)) || strings.Contains(strings.ToLower(logs), hex.EncodeToString(k)) ||
				strings.Contains(logs, hex.EncodeToString(k[:8])) {
				t.Errorf("key material of %s appears in the log", r.name)
			}
		}
		r.mu.Unlock()
	}
}

type logWriter struct {
	mu  sync.Mutex
	t   testing.TB
	buf bytes.Buffer
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.t != nil {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}
