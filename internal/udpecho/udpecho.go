// Package udpecho measures how long traffic between two network namespaces
// stops while a test breaks and repairs something: a prober in one
// namespace sends a datagram every interval to an echo server in the other
// and timestamps every reply, in process (no ping started per probe, which
// under the VM's emulation costs more than the outage being measured).
package udpecho

import (
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/netns"
)

// Prober is a running prober and its echo server; t.Cleanup stops both.
type Prober struct {
	mu      sync.Mutex
	replies []time.Time
}

// Start runs an echo server on srv (an address of to) and a prober in from
// sending to it every interval.
func Start(t testing.TB, from, to *netns.NS, srv netip.AddrPort, interval time.Duration) *Prober {
	t.Helper()
	var sc, cc *net.UDPConn
	if err := to.Do(func() (err error) { sc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(srv)); return err }); err != nil {
		t.Fatal(err)
	}
	if err := from.Do(func() (err error) { cc, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(srv)); return err }); err != nil {
		sc.Close()
		t.Fatal(err)
	}
	p := &Prober{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { // echo server
		defer wg.Done()
		b := make([]byte, 64)
		for {
			n, from, err := sc.ReadFromUDPAddrPort(b)
			if err != nil {
				return
			}
			sc.WriteToUDPAddrPort(b[:n], from)
		}
	}()
	go func() { // replies
		defer wg.Done()
		b := make([]byte, 64)
		for {
			if _, err := cc.Read(b); err != nil {
				select {
				case <-stop:
					return
				default:
					continue // ICMP errors while the path is broken
				}
			}
			p.mu.Lock()
			p.replies = append(p.replies, time.Now())
			p.mu.Unlock()
		}
	}()
	go func() { // probes
		defer wg.Done()
		tk := time.NewTicker(interval)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				cc.Write([]byte("btmm-probe"))
			}
		}
	}()
	t.Cleanup(func() {
		close(stop)
		sc.Close()
		cc.Close()
		wg.Wait()
	})
	return p
}

// Outage waits (up to timeout) for a reply after after, then returns the
// longest time without replies from the last reply before since to that
// reply: how long traffic stopped around a break made between since and
// after. It reports false if no reply came.
func (p *Prober) Outage(since, after time.Time, timeout time.Duration) (time.Duration, bool) {
	deadline := time.Now().Add(timeout)
	for {
		p.mu.Lock()
		r := slices.Clone(p.replies)
		p.mu.Unlock()
		i := slices.IndexFunc(r, func(x time.Time) bool { return x.After(after) })
		if i >= 0 {
			j := slices.IndexFunc(r, func(x time.Time) bool { return !x.Before(since) })
			if j > 0 {
				j-- // the last reply before the break
			}
			var gap time.Duration
			for k := max(j, 0) + 1; k <= i; k++ {
				gap = max(gap, r[k].Sub(r[k-1]))
			}
			return gap, true
		}
		if time.Now().After(deadline) {
			return 0, false
		}
		time.Sleep(10 * time.Millisecond)
	}
}
