package xfrm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

func TestConnKeyingRoundTrip(t *testing.T) {
	ctx := context.Background()
	a, err := Listen(ctx, netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Listen(ctx, netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	// Noise a tunnel port sees besides keying: a short non-marker datagram
	// (delivered by the kernel, skipped by ReadKeying) and a NAT keepalive
	// (eaten by the kernel).
	raw, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(b.LocalAddr()))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	if err := a.SendKeepalive(b.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	msg := []byte("AP-REQ 0123456789abcdef")
	if err := a.WriteKeying(msg, b.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, from, err := b.ReadKeying(buf)
	if err != nil {
		t.Fatal(err)
	}
	if string(buf[:n]) != string(msg) || from != a.LocalAddr() {
		t.Fatalf("ReadKeying = %q from %v, want %q from %v", buf[:n], from, msg, a.LocalAddr())
	}

	// The marker is on the wire: a plain socket sees it.
	plain, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if err := a.WriteKeying([]byte("hi"), plain.LocalAddr().(*net.UDPAddr).AddrPort()); err != nil {
		t.Fatal(err)
	}
	plain.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err = plain.Read(buf)
	if err != nil || string(buf[:n]) != "\x00\x00\x00\x00hi" {
		t.Fatalf("on the wire: %q, %v; want marker + hi", buf[:n], err)
	}

	// A message longer than the caller's buffer is truncated (keying.Transport's contract).
	if err := a.WriteKeying([]byte("0123456789abcdef"), b.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	if n, _, err := b.ReadKeying(buf[:10]); err != nil || string(buf[:n]) != "0123456789" {
		t.Fatalf("short buffer: %q, %v; want the first 10 bytes", buf[:n], err)
	}
	// After Close, ReadKeying fails instead of blocking.
	b.Close()
	if _, _, err := b.ReadKeying(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("after Close: err = %v, want net.ErrClosed", err)
	}
}

// TestDualKeying: one keying channel over the IPv4 tunnel socket and the
// IPv6 keying socket; each destination gets the socket of its family, reads
// come from both, Close ends ReadKeying with an error.
func TestDualKeying(t *testing.T) {
	ctx := context.Background()
	v6a, err := Listen6(ctx, netip.MustParseAddrPort("[::1]:0"))
	if err != nil {
		testenv.Unavailable(t, "no IPv6 loopback: "+err.Error())
	}
	v6b, err := Listen6(ctx, netip.MustParseAddrPort("[::1]:0"))
	if err != nil {
		t.Fatal(err)
	}
	v4a, err := Listen(ctx, netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	v4b, err := Listen(ctx, netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewDual(v4a, v6a)
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewDual(v4b, v6b)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.WriteKeying([]byte("over v6"), v6b.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	if err := a.WriteKeying([]byte("over v4"), v4b.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	got := map[string]netip.AddrPort{}
	buf := make([]byte, 100)
	for range 2 {
		n, from, err := b.ReadKeying(buf)
		if err != nil {
			t.Fatal(err)
		}
		got[string(buf[:n])] = from
	}
	if got["over v6"] != v6a.LocalAddr() || got["over v4"] != v4a.LocalAddr() {
		t.Errorf("received %v; want over v6 from %v, over v4 from %v", got, v6a.LocalAddr(), v4a.LocalAddr())
	}
	if _, err := NewDual(nil, nil); err == nil {
		t.Error("NewDual without sockets accepted")
	}
	only4, _ := NewDual(v4a, nil)
	if err := only4.WriteKeying([]byte("x"), v6b.LocalAddr()); err == nil {
		t.Error("an IPv6 destination without an IPv6 socket: no error")
	}
	b.Close()
	done := make(chan error, 1)
	go func() { _, _, err := b.ReadKeying(buf); done <- err }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("ReadKeying after Close: no error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ReadKeying after Close did not return")
	}
}

// dualReaders counts the goroutines of Dual's readers, and of those the
// ones blocked in a select (handing a datagram over) rather than reading.
func dualReaders() (all, handing int) {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		lines := strings.Split(g, "\n")
		// The reader is the goroutine's first frame (its name depends on
		// inlining: xfrm.(*Dual).start.func1.1 or <caller>.(*Dual).start.func2.1).
		if len(lines) < 2 || !strings.Contains(lines[1], ".(*Dual).start.func") {
			continue
		}
		head := lines[0]
		all++
		if strings.Contains(head, "[select") {
			handing++
		}
	}
	return all, handing
}

// TestDualCloseUnblocksReaders: a reader blocked handing a datagram to a
// full channel (nobody calls ReadKeying any more) leaves when Dual closes,
// and ReadKeying after Close fails at once instead of returning what was
// buffered.
func TestDualCloseUnblocksReaders(t *testing.T) {
	ctx := context.Background()
	before, _ := dualReaders()
	v4, err := Listen(ctx, netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	snd, err := Listen(ctx, netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer snd.Close()
	d, err := NewDual(v4, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.start()
	// Fill rx (cap 64) and give the reader one more to block on.
	for i := range cap(d.rx) + 1 {
		if err := snd.WriteKeying([]byte(fmt.Sprint("msg ", i)), v4.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); len(d.rx) < cap(d.rx); {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d datagrams buffered", len(d.rx), cap(d.rx))
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The reader reads the 65th and blocks handing it over.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, n := dualReaders(); n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the reader never blocked on the full channel")
		}
	}
	closed := make(chan error, 1)
	go func() { closed <- d.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	for deadline := time.Now().Add(5 * time.Second); ; {
		n, _ := dualReaders()
		if n <= before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d Dual reader goroutine(s) still running after Close", n-before)
		}
		time.Sleep(10 * time.Millisecond)
	}
	buf := make([]byte, 100)
	if n, _, err := d.ReadKeying(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadKeying after Close = %q, %v; want net.ErrClosed", buf[:n], err)
	}
}
