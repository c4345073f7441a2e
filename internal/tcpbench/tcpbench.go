// Package tcpbench measures bulk TCP throughput between two network
// namespaces for btmm's benchmarks: a listener in one, a sender in the other,
// both sockets made inside their namespace (a socket keeps the namespace it
// was created in) and then driven by ordinary goroutines. It replaces iperf3
// there: one binary less in the VM, and no server process to start, wait
// for and stop between rounds.
package tcpbench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"time"
)

// NS runs f inside a network namespace (internal/netns.NS.Do).
type NS interface {
	Do(f func() error) error
}

// Result is one transfer, as the receiver saw it.
type Result struct {
	Bytes   int64
	Elapsed time.Duration // first byte to last
}

// BitsPerSecond is the receiver's throughput.
func (r Result) BitsPerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Bytes) * 8 / r.Elapsed.Seconds()
}

// Mbps is the receiver's throughput in Mbit/s.
func (r Result) Mbps() float64 { return r.BitsPerSecond() / 1e6 }

// Run sends from namespace from to dst (an address of namespace to) for d
// and returns what the receiver got. The port is chosen by the kernel.
func Run(ctx context.Context, from, to NS, dst netip.Addr, d time.Duration) (Result, error) {
	var ln net.Listener
	if err := to.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
		return err
	}); err != nil {
		return Result{}, fmt.Errorf("tcpbench: listen on %s: %w", dst, err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	type recv struct {
		r   Result
		err error
	}
	done := make(chan recv, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- recv{err: err}
			return
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		var r Result
		var first time.Time
		for {
			n, err := c.Read(buf)
			if n > 0 && first.IsZero() {
				first = time.Now()
			}
			r.Bytes += int64(n)
			if err != nil {
				r.Elapsed = time.Since(first)
				if errors.Is(err, io.EOF) {
					err = nil
				}
				done <- recv{r, err}
				return
			}
		}
	}()
	var c net.Conn
	if err := from.Do(func() (err error) {
		c, err = (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, "tcp", addr)
		return err
	}); err != nil {
		return Result{}, fmt.Errorf("tcpbench: dial %s: %w", addr, err)
	}
	var stop atomic.Bool
	t := time.AfterFunc(d, func() { stop.Store(true) })
	defer t.Stop()
	buf := make([]byte, 128<<10)
	var werr error
	for !stop.Load() && ctx.Err() == nil {
		c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, werr = c.Write(buf); werr != nil {
			break
		}
	}
	c.Close()
	if werr != nil {
		return Result{}, fmt.Errorf("tcpbench: send to %s: %w", addr, werr)
	}
	select {
	case r := <-done:
		if r.err != nil {
			return r.r, fmt.Errorf("tcpbench: receive on %s: %w", addr, r.err)
		}
		return r.r, nil
	case <-time.After(d + 30*time.Second):
		return Result{}, fmt.Errorf("tcpbench: receiver on %s did not finish", addr)
	}
}
