package agent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/path"
)

// ErrNoSuchPeer: Ping was given a name or address that is none of the
// user's other hosts.
var ErrNoSuchPeer = errors.New("no such peer")

// PingResult is one echo through the tunnel (btmmctl ping).
type PingResult struct {
	Peer string     `json:"peer"`
	ULA  netip.Addr `json:"ula"`
	Seq  int        `json:"seq"`
	// RTT is the round trip of the ICMPv6 echo from our ULA to the peer's
	// (zero when no reply came: Error says why).
	RTT time.Duration `json:"rtt"`
	// Path is how the tunnel reached the peer: its kind, our outer
	// endpoint (the tunnel port on the address the kernel sends from) and
	// the peer's.
	Path path.Path `json:"path"`
	// PathProbeRTT is the last round trip of the connectivity checks
	// (package path) on that path; zero without path selection.
	PathProbeRTT time.Duration `json:"path_probe_rtt,omitempty"`
	// OuterSource says where the peer's outer endpoint was learnt (dns,
	// keying, kernel, path).
	OuterSource string `json:"outer_source"`
	// External is our tunnel port as the peer sees it (the NAT mapping).
	External netip.AddrPort `json:"external"`
	// InTunnel: the peer's kernel SA counters show a packet received
	// during the echo, so the reply came through the tunnel.
	InTunnel bool   `json:"in_tunnel"`
	Error    string `json:"error,omitempty"`
}

// Ping sends one ICMPv6 echo request from this host's ULA to a peer's ULA
// (the kernel's tunnel for the pair carries it) and waits up to timeout for
// the reply. peer is a host name (short or fully qualified) or a ULA. An
// unanswered echo is a result with Error set, not an error; errors are for
// an unknown peer or a socket that cannot be opened.
func (a *Agent) Ping(ctx context.Context, peer string, seq int, timeout time.Duration) (PingResult, error) {
	p, ok := a.findPeer(peer)
	if !ok {
		return PingResult{}, fmt.Errorf("%w: %q (btmmctl peers lists them)", ErrNoSuchPeer, peer)
	}
	r := PingResult{Peer: p.Name, ULA: p.ULA, Seq: seq, OuterSource: p.OuterBy}
	r.Path, r.PathProbeRTT = a.pathOf(p)
	a.mu.Lock()
	r.External = a.nat.External
	a.mu.Unlock()
	if a.cfg.NAT == nil {
		r.External = a.cfg.External
	}
	if !p.Keyed || !p.InKernel {
		a.mu.Lock()
		h := a.peerHealthLocked(p, nil, time.Now())
		a.mu.Unlock()
		r.Error = "no tunnel to " + p.Name + ": " + h.Reason
		return r, nil
	}
	before, _ := a.peerCounters(ctx, p.ULA)
	rtt, err := echo(ctx, a.cfg.Identity.ULA, p.ULA, seq, timeout)
	if err != nil {
		r.Error = err.Error()
		return r, nil
	}
	r.RTT = rtt
	if after, ok := a.peerCounters(ctx, p.ULA); ok {
		r.InTunnel = after.RxPackets > before.RxPackets
	}
	return r, nil
}

// findPeer looks a peer up by name, FQDN or ULA.
func (a *Agent) findPeer(s string) (controlplane.PeerStatus, bool) {
	peers, _, _ := a.rec.Status()
	name := strings.TrimSuffix(strings.TrimSuffix(strings.ToLower(s), "."), "."+strings.ToLower(strings.TrimSuffix(a.cfg.Domain, ".")))
	ula, _ := netip.ParseAddr(s)
	for _, p := range peers {
		if strings.EqualFold(p.Name, name) || p.ULA == ula {
			return p, true
		}
	}
	return controlplane.PeerStatus{}, false
}

// pathOf is how the tunnel reaches a peer: the path the connectivity checks
// chose (paths.go), or without path selection the peer's outer endpoint,
// reached directly. Our end is the tunnel port on the address the kernel
// routes from, unless the path names another (a relay's local bridge).
// probeRTT is the chosen path's last probe round trip (package path), zero
// without one.
func (a *Agent) pathOf(p controlplane.PeerStatus) (pp path.Path, probeRTT time.Duration) {
	pp = a.paths.current(p.ULA)
	if !pp.IsValid() {
		if !p.Outer.IsValid() {
			return path.Path{}, 0
		}
		pp = path.Path{Kind: path.KindDirect, Remote: p.Outer}
	} else if a.paths != nil {
		for _, ps := range a.paths.sel.Status() {
			if ps.ULA != p.ULA {
				continue
			}
			for _, c := range ps.Candidates {
				if c.Addr == pp.Remote && c.Alive {
					probeRTT = c.RTT
				}
			}
		}
	}
	if !pp.Local.IsValid() {
		if src, err := sourceFor(pp.Remote); err == nil {
			pp.Local = netip.AddrPortFrom(src, a.cfg.TunnelPort)
		}
	}
	return pp, probeRTT
}

// sourceFor is the address the kernel sends from to reach dst (a connected
// UDP socket's local address: a route lookup, no packet sent).
func sourceFor(dst netip.AddrPort) (netip.Addr, error) {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
	if err != nil {
		return netip.Addr{}, err
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}

// peerCounters reads one peer's kernel counters.
func (a *Agent) peerCounters(ctx context.Context, ula netip.Addr) (controlplane.PeerStats, bool) {
	ctx, cancel := context.WithTimeout(ctx, statusWait)
	defer cancel()
	st, err := a.cfg.Dataplane.Stats(ctx)
	if err != nil {
		return controlplane.PeerStats{}, false
	}
	for _, s := range st {
		if s.ULA == ula {
			return s, true
		}
	}
	return controlplane.PeerStats{}, false
}

// sendEcho is the liveness probe (health.go): one echo request, the reply
// (if any) is seen in the kernel's counters.
func (a *Agent) sendEcho(ula netip.Addr) {
	ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
	defer cancel()
	if _, err := echo(ctx, a.cfg.Identity.ULA, ula, 0, 2*time.Second); err != nil {
		a.log.Debug("liveness echo", "peer", ula, "err", err)
	}
}

// echo sends an ICMPv6 echo request from src to dst on a raw socket bound
// to src and waits for the matching reply.
func echo(ctx context.Context, src, dst netip.Addr, seq int, timeout time.Duration) (time.Duration, error) {
	c, err := icmp.ListenPacket("ip6:ipv6-icmp", src.String())
	if err != nil {
		return 0, fmt.Errorf("ping: ICMPv6 socket on %v: %w", src, err)
	}
	defer c.Close()
	var f ipv6.ICMPFilter
	f.SetAll(true)
	f.Accept(ipv6.ICMPTypeEchoReply)
	c.IPv6PacketConn().SetICMPFilter(&f)
	var idb [2]byte
	rand.Read(idb[:])
	id := int(binary.BigEndian.Uint16(idb[:]))
	payload := []byte("btmmctl ping " + time.Now().UTC().Format(time.RFC3339Nano))
	msg := icmp.Message{Type: ipv6.ICMPTypeEchoRequest, Body: &icmp.Echo{ID: id, Seq: seq & 0xffff, Data: payload}}
	b, err := msg.Marshal(nil) // the kernel fills in the ICMPv6 checksum
	if err != nil {
		return 0, fmt.Errorf("ping: %w", err)
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c.SetDeadline(deadline)
	sent := time.Now()
	if _, err := c.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return 0, fmt.Errorf("ping: send to %v: %w", dst, err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return 0, fmt.Errorf("no reply from %v within %v", dst, timeout)
			}
			return 0, fmt.Errorf("ping: %w", err)
		}
		rtt := time.Since(sent)
		fa, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP)
		if fa.Unmap() != dst {
			continue
		}
		m, err := icmp.ParseMessage(58, buf[:n])
		if err != nil || m.Type != ipv6.ICMPTypeEchoReply {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && e.Seq == seq&0xffff {
			return rtt, nil
		}
	}
}
