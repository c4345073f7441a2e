// Package udpflood sends UDP datagrams from inside a network namespace as fast
// as one socket can, for dataplane tests that change kernel state (SAs,
// maps) under traffic, and reads the kernel's XFRM error counters
// (/proc/net/xfrm_stat) of a namespace.
package udpflood

import (
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/netns"
)

// Flood is a running sender.
type Flood struct {
	conn         *net.UDPConn
	sent, failed atomic.Int64
	first        atomic.Value // first send error
	stop         chan struct{}
	wg           sync.WaitGroup
	once         sync.Once
}

// Start opens a UDP socket in ns towards to and sends 64-byte datagrams until
// Stop (also called at t.Cleanup).
func Start(t testing.TB, ns *netns.NS, to netip.AddrPort) *Flood {
	t.Helper()
	f := &Flood{stop: make(chan struct{})}
	if err := ns.Do(func() (err error) {
		f.conn, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		payload := make([]byte, 64)
		for {
			select {
			case <-f.stop:
				return
			default:
			}
			if _, err := f.conn.Write(payload); err != nil {
				f.failed.Add(1)
				f.first.CompareAndSwap(nil, err)
				continue
			}
			f.sent.Add(1)
		}
	}()
	t.Cleanup(func() { f.Stop() })
	return f
}

// Wait blocks until n more datagrams have been tried (sent or failed); false
// if that takes longer than timeout (the sender stalled).
func (f *Flood) Wait(n int64, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for start := f.tried(); f.tried() < start+n; time.Sleep(100 * time.Microsecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

func (f *Flood) tried() int64 { return f.sent.Load() + f.failed.Load() }

// Stop ends the flood and reports how many datagrams went out, how many
// sends failed and the first failure.
func (f *Flood) Stop() (sent, failed int64, first error) {
	f.once.Do(func() {
		close(f.stop)
		f.wg.Wait()
		f.conn.Close()
	})
	first, _ = f.first.Load().(error)
	return f.sent.Load(), f.failed.Load(), first
}

// XfrmStat returns ns's /proc/net/xfrm_stat as counter -> value.
func XfrmStat(t testing.TB, ns *netns.NS) map[string]int64 {
	t.Helper()
	out, err := ns.Run("cat", "/proc/net/xfrm_stat")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int64{}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatalf("xfrm_stat line %q: %v", l, err)
			}
			m[f[0]] = n
		}
	}
	if _, ok := m["XfrmOutStateInvalid"]; !ok {
		t.Fatalf("xfrm_stat without XfrmOutStateInvalid:\n%s", out)
	}
	return m
}

// NonZero lists the non-zero counters of XfrmStat, for failure messages.
func NonZero(m map[string]int64) string {
	var b strings.Builder
	for k, v := range m {
		if v != 0 {
			b.WriteString(k + " " + strconv.FormatInt(v, 10) + "\n")
		}
	}
	return b.String()
}
