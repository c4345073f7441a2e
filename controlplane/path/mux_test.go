package path

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane/keying"
)

// TestMux: one real UDP socket; keying messages reach ReadKeying, probes
// and STUN their handlers, in arrival order per class.
func TestMux(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, err := keying.ListenUDP(lo)
	if err != nil {
		t.Fatal(err)
	}
	b, err := keying.ListenUDP(lo)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	m := NewMux(b)
	probes, stuns := make(chan []byte, 4), make(chan []byte, 4)
	m.HandleProbes(func(p []byte, _ netip.AddrPort) { probes <- p })
	m.HandleSTUN(func(p []byte, _ netip.AddrPort) { stuns <- p })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	to := b.LocalAddr()
	stun := []byte{0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	ping := (&Probe{Type: Ping}).Seal(make([]byte, 32))
	for _, msg := range [][]byte{{1, 1, 1, 0, 9}, stun, ping, {1, 2, 1, 0, 9}} {
		if err := a.WriteKeying(msg, to); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 100)
	for _, want := range []byte{1, 2} {
		n, from, err := m.ReadKeying(buf)
		if err != nil || n != 5 || buf[1] != want || from != a.LocalAddr() {
			t.Fatalf("ReadKeying = %x from %v, %v; want keying type %d", buf[:n], from, err, want)
		}
	}
	for name, ch := range map[string]chan []byte{"probe": probes, "stun": stuns} {
		select {
		case <-ch:
		case <-time.After(5 * time.Second):
			t.Errorf("no %s delivered", name)
		}
	}
	cancel()
	b.Close()
	if err := <-done; err != nil {
		t.Errorf("Run after close with ctx done: %v", err)
	}
	if _, _, err := m.ReadKeying(buf); err == nil {
		t.Error("ReadKeying after close: no error")
	}
}
