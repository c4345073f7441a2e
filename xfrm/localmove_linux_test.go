package xfrm

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/repair"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// localGolden is the kernel with peers b and c and our outer address local.
func localGolden(local string) string {
	lines := strings.Split(strings.TrimSpace(strings.ReplaceAll(`addr fd00::a/128 dev btmm0
link btmm0 xfrm if_id 0x6281 up
policy dir fwd fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.0.2 -> LOCAL esp tunnel reqid 0x6281
policy dir fwd fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> LOCAL esp tunnel reqid 0x6281
policy dir in fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.0.2 -> LOCAL esp tunnel reqid 0x6281
policy dir in fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> LOCAL esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::b/128 if_id 0x6281 tmpl LOCAL -> 10.0.0.2 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::c/128 if_id 0x6281 tmpl LOCAL -> 11.0.0.9 esp tunnel reqid 0x6281
route fd00::b/128 dev btmm0 src fd00::a proto 98 mtu 1438
route fd00::c/128 dev btmm0 src fd00::a proto 98 mtu 1438
state 10.0.0.2:4500 -> LOCAL:4500 spi 0x00001002 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
state 11.0.0.9:61000 -> LOCAL:4500 spi 0x00002002 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::c/128 -> fd00::a/128
state LOCAL:4500 -> 10.0.0.2:4500 spi 0x00001001 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::b/128
state LOCAL:4500 -> 11.0.0.9:61000 spi 0x00002001 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::c/128
`, "LOCAL", local)), "\n")
	slices.Sort(lines) // as render sorts them
	return strings.Join(lines, "\n") + "\n"
}

// TestSetLocalMove: our own outer address changes (an explicit
// Local.Outer, then the kernel's choice, then the kernel's choice changing
// under an unchanged desired state: "we moved"). Every SA of both peers
// moves (XFRM_MSG_MIGRATE, or re-added with its replay state), SPIs and
// sequence numbers stay, the policies' templates follow, nothing else
// changes; the same state again changes nothing.
func TestSetLocalMove(t *testing.T) {
	for _, mode := range []struct {
		name      string
		noMigrate bool
		how       string
	}{{"migrate", false, "(migrate)"}, {"re-add", true, "(re-added with replay state)"}} {
		t.Run(mode.name, func(t *testing.T) {
			k := newFakeKernel()
			k.noMigrate = mode.noMigrate
			d := newFake(t, k, Config{})
			peers := []controlplane.Peer{
				peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)),
				peer("c", ulaC, "11.0.0.9:61000", gcm(0x2001), gcm(0x2002)),
			}
			st := stateOf(peers...)
			if _, err := d.Set(context.Background(), st); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(localGolden("10.0.0.1"), mustRender(t, k)); diff != "" {
				t.Fatalf("before (-want +got):\n%s", diff)
			}
			for _, step := range []struct {
				name  string
				outer string // Local.Outer; "" is the kernel's choice
				route string // the kernel's source towards the peers
				want  string
			}{
				{"explicit new outer address", "10.0.5.1", "10.0.0.1", "10.0.5.1"},
				{"kernel's choice", "", "10.0.7.1", "10.0.7.1"},
				{"kernel's choice changed, same desired state", "", "10.0.8.1", "10.0.8.1"},
			} {
				k.routeSrc = net.ParseIP(step.route).To4()
				st.Local.Outer = netip.Addr{}
				if step.outer != "" {
					st.Local.Outer = netip.MustParseAddr(step.outer)
				}
				for i := range k.states {
					k.states[i].Replay = &netlink.XfrmReplayState{OSeq: 1000, Seq: 2000, BitMap: 0xff}
				}
				migrated := k.migrated
				ch, err := d.Set(context.Background(), st)
				if err != nil {
					t.Fatalf("%s: %v", step.name, err)
				}
				if diff := cmp.Diff(localGolden(step.want), mustRender(t, k)); diff != "" {
					t.Fatalf("%s: kernel (-want +got):\n%s", step.name, diff)
				}
				moves := 0
				for _, c := range ch {
					switch {
					case c.Op == "move" && c.Object == "state":
						moves++
						if !strings.HasSuffix(c.What, mode.how) {
							t.Errorf("%s: %v, want it done %s", step.name, c, mode.how)
						}
					case c.Op == "update" && c.Object == "policy":
					default:
						t.Errorf("%s: unexpected change %v (a local move only moves SAs and rewrites templates)", step.name, c)
					}
				}
				if moves != 4 {
					t.Errorf("%s: %d SA moves, want 4: %q", step.name, moves, changeStrings(ch))
				}
				if !mode.noMigrate && k.migrated-migrated != 4 {
					t.Errorf("%s: %d migrations, want 4", step.name, k.migrated-migrated)
				}
				for _, s := range k.states {
					wantOSeq := uint32(1000)
					if mode.noMigrate && ipAddr(s.Selector.Src.IP) == ulaA {
						wantOSeq += 128 // re-added outbound SA skips ahead
					}
					if s.Replay.OSeq != wantOSeq || s.Replay.Seq != 2000 || s.Replay.BitMap != 0xff {
						t.Errorf("%s: spi 0x%x replay %+v: sequence numbers lost", step.name, s.Spi, *s.Replay)
					}
				}
				if ch, err := d.Set(context.Background(), st); err != nil || len(ch) != 0 {
					t.Errorf("%s: same state again = %q, %v; want nothing", step.name, changeStrings(ch), err)
				}
			}
		})
	}
}

// TestSetLocalMoveFallback: without xfrm interfaces the routes go via the
// outer device; when the route to the peers moves to another device (the
// kernel's choice, or Local.Device), the routes follow.
func TestSetLocalMoveFallback(t *testing.T) {
	k := newFakeKernel()
	k.noXfrmi = true
	must(t, k.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth1", Flags: net.FlagUp}}))
	d := newFake(t, k, Config{})
	st := stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))
	st.Local.Outer = netip.Addr{}
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	route := func() string {
		for _, l := range strings.Split(mustRender(t, k), "\n") {
			if strings.HasPrefix(l, "route ") {
				return l
			}
		}
		return ""
	}
	if got, want := route(), "route fd00::b/128 dev eth0 src fd00::a proto 98 mtu 1438"; got != want {
		t.Fatalf("route %q, want %q", got, want)
	}
	// The default route now leaves through eth1 with another source.
	k.routeDev, k.routeSrc = 3, net.ParseIP("10.0.9.1").To4()
	ch, err := d.Set(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := route(), "route fd00::b/128 dev eth1 src fd00::a proto 98 mtu 1438"; got != want {
		t.Errorf("route %q after the move, want %q; changes %q", got, want, changeStrings(ch))
	}
	if r := mustRender(t, k); !strings.Contains(r, "state 10.0.9.1:4500 -> 10.0.0.2:4500 spi 0x00001001") {
		t.Errorf("outbound SA not moved to the new source:\n%s", r)
	}
	// An explicit Local.Device wins over the route lookup.
	st.Local.Device = "eth0"
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	if got, want := route(), "route fd00::b/128 dev eth0 src fd00::a proto 98 mtu 1438"; got != want {
		t.Errorf("route %q with Local.Device eth0, want %q", got, want)
	}
}

// TestVMLocalMove: host a moves from behind the router's first network
// (eth0, 10.0.1.2) to a second uplink (eth1, 10.0.9.2): new default route,
// new address, the old one removed. Local.Outer is zero (the kernel's
// choice), so the same desired state is Set again ("we moved"), and b learns
// a's new address. A TCP stream between the ULAs opened before the move
// delivers every byte, both SAs of each host move by XFRM_MSG_MIGRATE (the
// VM's kernel has it), SPIs and sequence numbers stay: no rekey.
func TestVMLocalMove(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	l := newLab(t, 2)
	a, b := l.hosts[0], l.hosts[1]
	must(t, a.ns.Sysctl("net.ipv6.conf.default.disable_ipv6", "1"))
	netns.MustVeth(t, a.ns, "eth1", l.r, "r9") // IPv4 only, like eth0
	must(t, a.ns.Sysctl("net.ipv6.conf.default.disable_ipv6", "0"))
	l.r.MustAddr(t, "r9", "10.0.9.1/24")
	a.ns.MustAddr(t, "eth1", "10.0.9.2/24")
	for i := range l.hosts {
		l.start(t, i, Config{Repair: repair.Config{Off: true}}) // Set alone follows the move
	}
	ast := l.desired(0)
	ast.Local.Outer = netip.Addr{} // the kernel's choice
	_, err := a.dp.Set(t.Context(), ast)
	must(t, err)
	l.set(t, 1)

	s := startByteStream(t, a, b)
	s.waitFor(t, 256<<10)
	spis := func(h *labHost) map[uint32]uint32 {
		ss, err := h.dp.states()
		must(t, err)
		m := map[uint32]uint32{}
		for _, st := range ss {
			m[uint32(st.Spi)] = st.Replay.OSeq
		}
		return m
	}
	beforeA, beforeB := spis(a), spis(b)

	a.ns.MustRun(t, "ip", "route", "replace", "default", "via", "10.0.9.1", "dev", "eth1")
	a.ns.MustRun(t, "ip", "addr", "del", a.outer.String()+"/24", "dev", "eth0")
	a.outer = netip.MustParseAddr("10.0.9.2")
	chA, err := a.dp.Set(t.Context(), ast) // unchanged desired state: "we moved"
	must(t, err)
	chB := l.set(t, 1)
	for name, ch := range map[string][]controlplane.Change{"a": chA, "b": chB} {
		t.Logf("%s: %q", name, changeStrings(ch))
		moves := 0
		for _, c := range ch {
			switch {
			case c.Op == "move" && c.Object == "state":
				moves++
				if !strings.HasSuffix(c.What, "(migrate)") {
					t.Errorf("%s: %v: want XFRM_MSG_MIGRATE (the VM's kernel has CONFIG_XFRM_MIGRATE)", name, c)
				}
			case c.Op == "update" && c.Object == "policy":
			default:
				t.Errorf("%s: unexpected change %v on a pure move", name, c)
			}
		}
		if moves != 2 {
			t.Errorf("%s: %d SA moves, want 2", name, moves)
		}
	}
	at := s.received.Load()
	s.waitFor(t, at+512<<10)
	s.finish(t)
	for name, x := range map[string]struct {
		h      *labHost
		before map[uint32]uint32
	}{"a": {a, beforeA}, "b": {b, beforeB}} {
		after := spis(x.h)
		if len(after) != len(x.before) {
			t.Errorf("%s: SPIs %v before, %v after", name, x.before, after)
		}
		for spi, oseq := range x.before {
			if got, ok := after[spi]; !ok || got < oseq {
				t.Errorf("%s: spi 0x%x: oseq %d before, %d after (present %v): rekeyed or reset", name, spi, oseq, got, ok)
			}
		}
	}
	ss, err := a.dp.states()
	must(t, err)
	for _, st := range ss {
		if !ipAddr(st.Src).Is4() || ipAddr(st.Src) != a.outer && ipAddr(st.Dst) != a.outer {
			t.Errorf("a's SA spi 0x%x %v -> %v does not use the new address %v", st.Spi, ipAddr(st.Src), ipAddr(st.Dst), a.outer)
		}
	}
	t.Logf("%d bytes intact across the move (%d before it); SPIs and sequence numbers kept", s.received.Load(), at)
}

// byteStream is a TCP connection from one lab host's ULA to another's;
// the receiver checks that the bytes are the sender's counter sequence.
type byteStream struct {
	c        net.Conn
	received atomic.Int64
	stop     chan struct{}
	writeErr chan error
	readErr  chan error
}

func startByteStream(t *testing.T, from, to *labHost) *byteStream {
	t.Helper()
	return startByteStreamPort(t, from, to, 5002)
}

// startByteStreamPort is startByteStream to another port of to's ULA.
func startByteStreamPort(t *testing.T, from, to *labHost, port int) *byteStream {
	t.Helper()
	var ln net.Listener
	must(t, to.ns.Do(func() (err error) {
		ln, err = net.Listen("tcp6", fmt.Sprintf("[%s]:%d", to.ula, port))
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	s := &byteStream{stop: make(chan struct{}), writeErr: make(chan error, 1), readErr: make(chan error, 1)}
	must(t, from.ns.Do(func() (err error) {
		d := net.Dialer{Timeout: 10 * time.Second}
		s.c, err = d.Dial("tcp6", fmt.Sprintf("[%s]:%d", to.ula, port))
		return err
	}))
	srv, err := ln.Accept()
	must(t, err)
	t.Cleanup(func() { srv.Close(); s.c.Close() })
	go func() {
		r := bufio.NewReaderSize(srv, 64<<10)
		var buf [8]byte
		for next := uint64(0); ; next++ {
			if _, err := io.ReadFull(r, buf[:]); err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				s.readErr <- err
				return
			}
			if v := binary.BigEndian.Uint64(buf[:]); v != next {
				s.readErr <- fmt.Errorf("stream corrupt at counter %d: got %d", next, v)
				return
			}
			s.received.Add(8)
		}
	}()
	go func() {
		buf := make([]byte, 8<<10)
		var ctr uint64
		for {
			select {
			case <-s.stop:
				s.writeErr <- s.c.Close()
				return
			default:
			}
			for i := 0; i < len(buf); i += 8 {
				binary.BigEndian.PutUint64(buf[i:], ctr)
				ctr++
			}
			s.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := s.c.Write(buf); err != nil {
				s.writeErr <- err
				return
			}
		}
	}()
	return s
}

func (s *byteStream) waitFor(t *testing.T, n int64) {
	t.Helper()
	waitFor(t, 30*time.Second, func() bool { return s.received.Load() >= n })
}

// finish stops the sender and waits for the receiver to see a clean end.
func (s *byteStream) finish(t *testing.T) {
	t.Helper()
	close(s.stop)
	if err := <-s.writeErr; err != nil {
		t.Fatalf("writer: %v", err)
	}
	select {
	case err := <-s.readErr:
		if err != nil {
			t.Fatalf("reader: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reader did not see the end of the stream")
	}
}
