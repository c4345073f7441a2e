package xfrm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// TestVMPing: two and three hosts behind a router, ping -6 between every
// pair of ULAs over ESP-in-UDP; a capture on host a's link holds only
// UDP 4500 with ESP inside (our SPIs, increasing sequence numbers) and ARP;
// Close leaves nothing of ours and foreign XFRM objects survive.
func TestVMPing(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	testenv.RequireBinary(t, "tcpdump", "tcpdump")
	testenv.RequireBinary(t, "tshark", "tshark")
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("%d hosts", n), func(t *testing.T) {
			l := newLab(t, n)
			before := make([]string, n)
			for i, h := range l.hosts {
				foreignXfrm(t, h.ns.Handle, true)
				var err error
				before[i], err = render(h.ns.Handle, "btmm0")
				must(t, err)
				l.start(t, i, Config{})
				l.set(t, i)
			}
			a, b := l.hosts[0], l.hosts[1]
			pcap := startCapture(t, l.r, "r0", func() { a.conn.SendKeepalive(netip.AddrPortFrom(b.outer, 4500)) })
			for i, h := range l.hosts {
				for j, p := range l.hosts {
					if i != j {
						out, err := h.ns.Run("ping", "-6", "-c", "3", "-i", "0.2", "-w", "10", p.ula.String())
						if err != nil || !strings.Contains(out, " 0% packet loss") {
							t.Fatalf("%s -> %s: ping -6 %s: %v\n%s", h.name, p.name, p.ula, err, out)
						}
					}
				}
			}
			frames := pcap.stop(t)
			want := map[uint32]bool{}
			for j := 1; j < n; j++ {
				want[spi(0, j)], want[spi(j, 0)] = true, true
			}
			w := checkWire(t, frames, want)
			// a pinged n-1 peers and each pinged a: 3 requests + 3 replies each way.
			if w.esp < 12*(n-1) {
				t.Errorf("captured %d ESP-in-UDP packets on a's link, want >= %d", w.esp, 12*(n-1))
			}
			t.Logf("a's link: %d ESP-in-UDP packets on %d SPIs, %d ARP, nothing else; sequence numbers per SPI: %v", w.esp, len(w.lastSeq), w.arp, w.seqs)
			// An independent decoder, given the keys, sees standard RFC 3948 + RFC 4106 ESP.
			if got := tsharkDecrypt(t, l, pcap.path); got != w.esp {
				t.Errorf("tshark decrypted %d ICMPv6 echo packets between ULAs, want all %d ESP packets", got, w.esp)
			}

			st, err := l.hosts[0].dp.Stats(t.Context())
			must(t, err)
			for _, s := range st {
				if s.TxPackets < 6 || s.RxPackets < 6 {
					t.Errorf("stats %+v: want >= 6 packets each way", s)
				}
			}
			for i, h := range l.hosts {
				must(t, h.dp.Close())
				after, err := render(h.ns.Handle, "btmm0")
				must(t, err)
				if after != before[i] {
					t.Errorf("host %s after Close:\n%s\nwant (foreign objects only):\n%s", h.name, after, before[i])
				}
			}
		})
	}
}

// TestVMMoveKeepsTCP: a TCP stream between two ULAs keeps going, without a
// reset or a lost byte, while host a's outer IPv4 address changes and Set
// moves the SAs on both hosts with XFRM_MSG_MIGRATE; the outbound sequence
// number is not reset. The kernel supports MIGRATE (Debian's has
// CONFIG_XFRM_MIGRATE), so a move that fell back to re-adding fails the test.
func TestVMMoveKeepsTCP(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	testMoveKeepsTCP(t, true)
}

// TestVMMoveKeepsTCPWithoutMigrate: the same move on a kernel built without
// CONFIG_XFRM_MIGRATE (XFRM_MSG_MIGRATE answers ENOPROTOOPT, as such a kernel
// does): every SA is re-added with its replay state and the stream survives.
func TestVMMoveKeepsTCPWithoutMigrate(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	testMoveKeepsTCP(t, false)
}

// noMigrate answers XFRM_MSG_MIGRATE like a kernel without CONFIG_XFRM_MIGRATE.
type noMigrate struct{ calls *atomic.Int64 }

func (n noMigrate) migrate(migration) error {
	n.calls.Add(1)
	return fmt.Errorf("XFRM_MSG_MIGRATE: %w", syscall.ENOPROTOOPT)
}

// migrateSupported asks h's kernel to migrate a policy that does not exist:
// a kernel with CONFIG_XFRM_MIGRATE looks for it (ENOENT), one without
// answers ENOPROTOOPT.
func migrateSupported(t *testing.T, h *labHost) bool {
	t.Helper()
	err := h.dp.mig.migrate(migration{Dir: 1, Reqid: 0x7e57,
		SelSrc: netip.MustParsePrefix("fd00:7e57::1/128"), SelDst: netip.MustParsePrefix("fd00:7e57::2/128"),
		OldSrc: netip.MustParseAddr("10.255.0.1"), OldDst: netip.MustParseAddr("10.255.0.2"),
		NewSrc: netip.MustParseAddr("10.255.0.3"), NewDst: netip.MustParseAddr("10.255.0.2"),
		EncapSport: 4500, EncapDport: 4500})
	switch {
	case errors.Is(err, syscall.ENOPROTOOPT):
		return false
	case errors.Is(err, syscall.ENOENT):
		return true
	}
	t.Fatalf("XFRM_MSG_MIGRATE probe for a missing policy: %v, want ENOENT or ENOPROTOOPT", err)
	return false
}

func testMoveKeepsTCP(t *testing.T, migrate bool) {
	l := newLab(t, 2)
	var refused atomic.Int64
	for i := range l.hosts {
		l.start(t, i, Config{})
		if migrate && !migrateSupported(t, l.hosts[i]) {
			t.Fatal("this kernel has no XFRM_MSG_MIGRATE (CONFIG_XFRM_MIGRATE): Debian's 6.1 has it")
		}
		if !migrate {
			l.hosts[i].dp.mig = noMigrate{&refused}
		}
		l.set(t, i)
	}
	a, b := l.hosts[0], l.hosts[1]
	// How every move must have been done.
	wantHow := "(migrate)"
	if !migrate {
		wantHow = "(re-added with replay state)"
	}
	var ln net.Listener
	must(t, b.ns.Do(func() (err error) { ln, err = net.Listen("tcp6", "["+b.ula.String()+"]:5001"); return err }))
	defer ln.Close()
	var c net.Conn
	must(t, a.ns.Do(func() (err error) {
		d := net.Dialer{Timeout: 10 * time.Second}
		c, err = d.Dial("tcp6", "["+b.ula.String()+"]:5001")
		return err
	}))
	srv, err := ln.Accept()
	must(t, err)

	var received atomic.Int64
	readErr := make(chan error, 1)
	go func() { // the receiver checks every byte: a counter stream
		buf := make([]byte, 64<<10)
		var next uint64
		var carry []byte
		for {
			n, err := srv.Read(buf)
			data := append(carry, buf[:n]...)
			for len(data) >= 8 {
				if v := binary.BigEndian.Uint64(data); v != next {
					readErr <- fmt.Errorf("stream corrupt at counter %d: got %d", next, v)
					return
				}
				next++
				data = data[8:]
			}
			carry = append([]byte(nil), data...)
			received.Add(int64(n))
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				readErr <- err
				return
			}
		}
	}()
	stop := make(chan struct{})
	writeErr := make(chan error, 1)
	go func() {
		buf := make([]byte, 8*1024)
		var ctr uint64
		for {
			select {
			case <-stop:
				writeErr <- c.Close()
				return
			default:
			}
			for i := 0; i < len(buf); i += 8 {
				binary.BigEndian.PutUint64(buf[i:], ctr)
				ctr++
			}
			c.SetWriteDeadline(time.Now().Add(20 * time.Second))
			if _, err := c.Write(buf); err != nil {
				writeErr <- err
				return
			}
		}
	}()
	waitFor(t, 20*time.Second, func() bool { return received.Load() > 256<<10 })
	oseq := outSeq(t, a, spi(0, 1))

	// a's outer address changes: new address first, Set on both ends, then the old one goes.
	old := a.outer
	a.outer = netip.MustParseAddr("10.0.1.3")
	a.ns.MustAddr(t, "eth0", "10.0.1.3/24")
	chA := l.set(t, 0)
	chB := l.set(t, 1)
	must(t, a.ns.Handle.AddrDel(mustLinkObj(t, a, "eth0"), mustParseAddr(t, old.String()+"/24")))
	if _, err := a.ns.Run("ip", "route", "replace", "default", "via", "10.0.1.1"); err != nil {
		t.Fatal(err)
	}
	for _, ch := range [][]controlplane.Change{chA, chB} {
		moves := 0
		for _, c := range ch {
			if c.Op == "move" {
				moves++
				t.Logf("%s", c)
				if !strings.HasSuffix(c.What, wantHow) {
					t.Errorf("move %s: want it done %s", c, wantHow)
				}
			} else if c.Object == "state" {
				t.Errorf("unexpected state change %s (want moves only)", c)
			}
		}
		if moves != 2 {
			t.Errorf("changes %q: want 2 SA moves", changeStrings(ch))
		}
	}
	if !migrate && refused.Load() == 0 {
		t.Error("the fallback was reached without trying XFRM_MSG_MIGRATE first")
	}
	at := received.Load()
	waitFor(t, 30*time.Second, func() bool { return received.Load() > at+512<<10 })
	if got := outSeq(t, a, spi(0, 1)); got < oseq {
		t.Errorf("out SA sequence number went from %d to %d: reset", oseq, got)
	} else {
		t.Logf("out SA oseq %d before the move, %d after: kept", oseq, got)
	}
	close(stop)
	if err := <-writeErr; err != nil {
		t.Fatalf("writer: %v", err)
	}
	select {
	case err := <-readErr:
		if err != nil {
			t.Fatalf("reader: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reader did not see the end of the stream")
	}
	t.Logf("%d bytes streamed intact across the move (%d before it)", received.Load(), at)
}

// TestVMEvents: the kernel's XFRM_MSG_MAPPING (the peer's packets arrive
// from another port than the SA says) and soft expire reach Events; following
// the mapping with Set moves the SA and traffic flows.
func TestVMEvents(t *testing.T) {
	testenv.Require(t, testenv.ESP, testenv.XfrmIface)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	l := newLab(t, 2)
	a, b := l.hosts[0], l.hosts[1]
	l.start(t, 0, Config{Lifetime: Lifetime{SoftPackets: 4}})
	l.start(t, 1, Config{})
	l.set(t, 1)
	// a believes b's NAT mapping is port 4501; b really sends from 4500.
	st := l.desired(0)
	st.Peers[0].Outer = netip.AddrPortFrom(b.outer, 4501)
	_, err := a.dp.Set(t.Context(), st)
	must(t, err)

	b.ns.Run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", a.ula.String()) // replies go to the wrong port
	var mapping *Event
	deadline := time.After(10 * time.Second)
	for mapping == nil {
		select {
		case e := <-a.dp.Events():
			t.Logf("event: %v", e)
			if e.Kind == Mapping {
				mapping = &e
			}
		case <-deadline:
			t.Fatal("no mapping event")
		}
	}
	if mapping.Peer != b.ula || mapping.New != netip.AddrPortFrom(b.outer, 4500) || mapping.SPI != spi(1, 0) {
		t.Fatalf("mapping event %v: want peer %v, new %v:4500, spi 0x%x", mapping, b.ula, b.outer, spi(1, 0))
	}
	st.Peers[0].Outer = mapping.New
	ch, err := a.dp.Set(t.Context(), st)
	must(t, err)
	t.Logf("followed the mapping: %q", changeStrings(ch))
	out, err := b.ns.Run("ping", "-6", "-c", "6", "-i", "0.2", "-w", "10", a.ula.String())
	if err != nil || !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("ping after following the mapping: %v\n%s", err, out)
	}
	deadline = time.After(10 * time.Second)
	for {
		select {
		case e := <-a.dp.Events():
			t.Logf("event: %v", e)
			if e.Kind == SoftExpire && e.Peer == b.ula {
				return
			}
		case <-deadline:
			t.Fatal("no soft-expire event after more packets than the soft limit")
		}
	}
}

func waitFor(t *testing.T, d time.Duration, f func() bool) {
	t.Helper()
	end := time.Now().Add(d)
	for !f() {
		if time.Now().After(end) {
			t.Fatalf("condition not met within %v", d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func outSeq(t *testing.T, h *labHost, s uint32) uint32 {
	t.Helper()
	ss, err := h.dp.states()
	must(t, err)
	for _, st := range ss {
		if uint32(st.Spi) == s && st.Replay != nil {
			return st.Replay.OSeq
		}
	}
	t.Fatalf("no SA 0x%x with replay state on %s", s, h.name)
	return 0
}

// --- capture -------------------------------------------------------------------

type capture struct {
	path  string
	poke  func()
	stopF func()
}

// startCapture runs tcpdump on dev in n and returns once it captures: poke
// is called until a packet shows up in the file.
func startCapture(t *testing.T, n *netns.NS, dev string, poke func()) *capture {
	t.Helper()
	return startCaptureSnap(t, n, dev, 256, poke)
}

// startCaptureSnap is startCapture keeping snap bytes of each frame (0:
// whole frames, for tshark to decrypt).
func startCaptureSnap(t *testing.T, n *netns.NS, dev string, snap int, poke func()) *capture {
	t.Helper()
	path := filepath.Join(t.TempDir(), dev+".pcap")
	cmd := n.Command(t.Context(), "tcpdump", "-n", "-U", "-s", fmt.Sprint(snap), "-i", dev, "-w", path)
	must(t, n.StartCmd(cmd))
	waitFor(t, 15*time.Second, func() bool {
		poke()
		fi, err := os.Stat(path)
		return err == nil && fi.Size() > 24
	})
	var once sync.Once
	return &capture{path: path, poke: poke, stopF: func() {
		once.Do(func() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
			done := make(chan struct{})
			go func() { cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
			}
		})
	}}
}

// stop ends the capture once tcpdump has written everything sent before:
// a poke sent now shows up as the file's last frame.
func (c *capture) stop(t *testing.T) [][]byte {
	t.Helper()
	read := func() [][]byte {
		b, err := os.ReadFile(c.path)
		must(t, err)
		frames, err := parsePcap(b)
		must(t, err)
		return frames
	}
	n := len(read())
	waitFor(t, 15*time.Second, func() bool {
		c.poke()
		time.Sleep(100 * time.Millisecond)
		f := read()
		return len(f) > n && isKeepalive(f[len(f)-1])
	})
	c.stopF()
	return read()
}

func isKeepalive(f []byte) bool {
	return len(f) >= 14+20+8+1 && binary.BigEndian.Uint16(f[12:]) == 0x0800 && f[14+9] == 17 &&
		len(f) == 14+int(f[14]&0xf)*4+8+1 && f[len(f)-1] == 0xff
}

// parsePcap returns the frames of a classic little-endian pcap file with
// Ethernet link type.
func parsePcap(b []byte) ([][]byte, error) {
	if len(b) < 24 || binary.LittleEndian.Uint32(b) != 0xa1b2c3d4 {
		return nil, errors.New("pcap: not a little-endian microsecond pcap file")
	}
	if lt := binary.LittleEndian.Uint32(b[20:]); lt != 1 {
		return nil, fmt.Errorf("pcap: link type %d, want Ethernet", lt)
	}
	var frames [][]byte
	for b = b[24:]; len(b) >= 16; {
		n := int(binary.LittleEndian.Uint32(b[8:]))
		if len(b) < 16+n {
			break // cut off at stop
		}
		frames = append(frames, b[16:16+n])
		b = b[16+n:]
	}
	return frames, nil
}

type wireSummary struct {
	esp, arp int
	lastSeq  map[uint32]uint32
	seqs     map[uint32][]uint32
}

// checkWire fails t for any frame that is not ARP or IPv4/UDP 4500->4500
// carrying ESP with one of want's SPIs and a sequence number above the
// last one seen for that SPI (RFC 4303 §3.3.3), a keying message or a
// NAT-keepalive (RFC 3948).
func checkWire(t *testing.T, frames [][]byte, want map[uint32]bool) wireSummary {
	t.Helper()
	w := wireSummary{lastSeq: map[uint32]uint32{}, seqs: map[uint32][]uint32{}}
	for i, f := range frames {
		bad := func(why string) { t.Errorf("frame %d: %s: % x", i, why, f[:min(len(f), 64)]) }
		if len(f) < 14 {
			bad("short")
			continue
		}
		switch binary.BigEndian.Uint16(f[12:]) {
		case 0x0806:
			w.arp++
			continue
		case 0x0800:
		default:
			bad("not IPv4 or ARP")
			continue
		}
		ip := f[14:]
		ihl := int(ip[0]&0xf) * 4
		if ip[0]>>4 != 4 || ip[9] != 17 || len(ip) < ihl+8 {
			bad("not UDP over IPv4")
			continue
		}
		udp := ip[ihl:]
		if binary.BigEndian.Uint16(udp) != 4500 || binary.BigEndian.Uint16(udp[2:]) != 4500 {
			bad("not UDP 4500 -> 4500")
			continue
		}
		payload := udp[8:]
		switch {
		case len(payload) == 1 && payload[0] == 0xff:
			continue // NAT-keepalive
		case len(payload) >= 4 && binary.BigEndian.Uint32(payload) == 0:
			continue // keying message behind the non-ESP marker
		case len(payload) < 8+8+16:
			bad("too short for ESP with AES-GCM")
			continue
		}
		s, seq := binary.BigEndian.Uint32(payload), binary.BigEndian.Uint32(payload[4:])
		if !want[s] {
			bad(fmt.Sprintf("ESP with unexpected SPI 0x%08x", s))
			continue
		}
		if seq <= w.lastSeq[s] {
			bad(fmt.Sprintf("SPI 0x%08x sequence %d after %d", s, seq, w.lastSeq[s]))
		}
		w.lastSeq[s] = seq
		w.seqs[s] = append(w.seqs[s], seq)
		w.esp++
	}
	return w
}

// tsharkDecrypt has tshark decode the capture with every SA's key and
// returns how many ESP packets decrypt to ICMPv6 echoes between our ULAs.
// The keys go on tshark's command line only, never into the test log.
func tsharkDecrypt(t *testing.T, l *lab, path string) int {
	t.Helper()
	args := []string{"-n", "-r", path, "-o", "esp.enable_encryption_decode:TRUE", "-o", "udp.try_heuristic_first:FALSE"}
	for ij, key := range l.keys {
		src, dst := l.hosts[ij[0]], l.hosts[ij[1]]
		args = append(args, "-o", fmt.Sprintf(`uat:esp_sa:"IPv4","%s","%s","0x%08x","AES-GCM with 16 octet ICV [RFC4106]","0x%x","NULL",""`,
			src.outer, dst.outer, spi(ij[0], ij[1]), key))
	}
	args = append(args, "-Y", "udp.port == 4500 && esp && (icmpv6.type == 128 || icmpv6.type == 129)", "-T", "fields", "-e", "esp.spi", "-e", "ipv6.src", "-e", "ipv6.dst", "-e", "icmpv6.type")
	out, err := exec.Command("tshark", args...).Output()
	if err != nil {
		t.Fatalf("tshark: %v", err) // the error carries no arguments
	}
	n := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) == 4 && strings.HasPrefix(f[1], "fd00::") && strings.HasPrefix(f[2], "fd00::") {
			n++
		}
	}
	t.Logf("tshark decrypted %d packets, e.g. %q", n, strings.SplitN(string(out), "\n", 2)[0])
	return n
}
