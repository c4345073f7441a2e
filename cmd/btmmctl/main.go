// Command btmmctl: see the usage text below (`btmmctl --help`).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/btmm/btmm/cmd/internal/cli"
	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
	"github.com/btmm/btmm/dns/llqclient"
)

const synopsis = `btmmctl: inspect a running btmmd.

Usage: btmmctl [flags] <command> [command flags]

Commands:
  status [PEER]
           this host: identity, NAT mapping, registration, LLQ, dataplane,
           and each peer's health; with PEER, everything about that peer
           (full error texts, keys' SPIs, counters, capabilities)
  peers    the user's other hosts: health (ok, stale, unreachable), path,
           outer address, keys, last handshake, last packet received
  ping [-c N] [-i S] [-W S] PEER
           ICMPv6 echoes from this host's ULA to PEER's (name, FQDN or ULA)
           through the tunnel: round trip, path kind and outer endpoints
           (default 4 echoes, -c 0: until interrupted)
  watch    follow btmmd's events as they happen (peers appearing, moving,
           keyed, health changes, NAT, network, registration, LLQ) until
           interrupted
  netcheck kernel features (ESP, GCM, xfrm interfaces, TCX), btmmd's tunnel
           port and NAT mapping, DNS registration, LLQ mode and why, KDC
           reachability
  completion
           print the bash completion script
  enroll [-dir D] [-config F] [-force] BUNDLE
           install a bundle from the server's "btmm-dnsd enroll USER HOST":
           key files (0600), krb5.conf, CA, and a working btmmd.toml

--json (before or after the command) prints the documented JSON schema
(docs/btmmctl.md): snake_case keys, durations in seconds; ping and watch
print one JSON object per line.

Kernel state is inspected with the kernel's own tools: ip xfrm state,
ip xfrm policy, ip -6 route show proto 98 (btmm's routes), bpftool map dump pinned /sys/fs/bpf/btmm/...`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// interrupted ends ping -c 0 and watch (SIGINT, SIGTERM); tests replace it.
var interrupted = func() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmmctl", synopsis)
	sock := fs.String("socket", agent.DefaultControlSocket, "btmmd's control socket")
	asJSON := fs.Bool("json", false, "print JSON (docs/btmmctl.md: snake_case keys, durations in seconds)")
	krb5Conf := fs.String("krb5-conf", "/etc/btmm/krb5.conf", "netcheck: the krb5.conf whose KDCs to try")
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	cmd := "status"
	if fs.NArg() > 0 {
		cmd = fs.Arg(0)
	}
	rest := fs.Args()
	if len(rest) > 0 {
		rest = rest[1:]
	}
	if cmd == "enroll" {
		return enrollCommand(rest, os.Stdin, stdout, stderr)
	}
	if cmd == "completion" {
		io.WriteString(stdout, bashCompletion)
		return 0
	}
	// The command's own flags; --json and --socket may follow the command too.
	sub := flag.NewFlagSet("btmmctl "+cmd, flag.ContinueOnError)
	sub.SetOutput(stderr)
	sub.BoolVar(asJSON, "json", *asJSON, "print JSON")
	sub.StringVar(sock, "socket", *sock, "btmmd's control socket")
	var count *int
	var interval, wait *float64
	switch cmd {
	case "ping":
		count = sub.Int("c", 4, "echoes to send (0: until interrupted)")
		interval = sub.Float64("i", 1, "seconds between echoes")
		wait = sub.Float64("W", 2, "seconds to wait for each reply")
	case "netcheck":
		sub.StringVar(krb5Conf, "krb5-conf", *krb5Conf, "the krb5.conf whose KDCs to try")
	case "status", "peers", "watch":
	default:
		fmt.Fprintf(stderr, "btmmctl: unknown command %q (try --help)\n", cmd)
		return 2
	}
	if err := sub.Parse(interleave(rest)); err != nil {
		return 2
	}
	switch cmd {
	case "netcheck":
		printNetcheck(stdout, netcheck(*sock, *krb5Conf), *asJSON)
		return 0
	case "ping":
		if sub.NArg() != 1 {
			fmt.Fprintln(stderr, "btmmctl: usage: btmmctl ping [-c N] [-i S] [-W S] PEER")
			return 2
		}
		return pingCommand(*sock, sub.Arg(0), *count, secondsOf(*interval), secondsOf(*wait), *asJSON, stdout, stderr)
	case "watch":
		return watchCommand(*sock, *asJSON, stdout, stderr)
	}
	if sub.NArg() > 1 || cmd == "peers" && sub.NArg() > 0 {
		fmt.Fprintf(stderr, "btmmctl: usage: btmmctl status [PEER] | btmmctl peers\n")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := agent.FetchStatus(ctx, *sock)
	if err != nil {
		fmt.Fprintln(stderr, "btmmctl:", err)
		return 1
	}
	now := time.Now()
	if sub.NArg() == 1 {
		return peerCommand(st, sub.Arg(0), *asJSON, now, stdout, stderr)
	}
	if *asJSON {
		out := statusJSON(st, now)
		if cmd == "peers" {
			out = &StatusJSON{Schema: out.Schema, Peers: out.Peers}
		}
		writeJSON(stdout, out)
		return 0
	}
	if cmd == "status" {
		printStatus(stdout, st)
	}
	printPeers(stdout, st, now)
	return 0
}

// interleave moves flags after positional arguments to the front, so
// "status desk --json" parses like "status --json desk".
func interleave(args []string) []string {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			pos = append(pos, args[i+1:]...)
			i = len(args)
		case strings.HasPrefix(a, "-") && len(a) > 1:
			flags = append(flags, a)
			name := strings.TrimLeft(a, "-")
			if !strings.Contains(name, "=") && slices.Contains([]string{"c", "i", "W", "socket", "krb5-conf"}, name) && i+1 < len(args) {
				i++
				flags = append(flags, args[i])
			}
		default:
			pos = append(pos, a)
		}
	}
	return append(append(flags, "--"), pos...)
}

func secondsOf(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func writeJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func printStatus(w io.Writer, st *agent.Status) {
	fmt.Fprintf(w, "host       %s.%s\n", st.Host, strings.TrimSuffix(st.Domain, "."))
	fmt.Fprintf(w, "ula        %s (%s, %s)\n", st.ULA, st.Label, st.IdentityBy)
	fmt.Fprintf(w, "dataplane  %s, tunnel port %d/udp\n", st.Dataplane, st.TunnelPort)
	if strings.Contains(st.Dataplane, "cleartext") {
		fmt.Fprintln(w, "           WARNING: CLEARTEXT — tunnel traffic is NOT encrypted")
	}
	ext := "unknown"
	if st.NAT.External.IsValid() {
		ext = st.NAT.External.String()
	}
	fmt.Fprintf(w, "external   %s (%s)\n", ext, st.NAT.Status)
	if n := st.Network; n.Following {
		state := "offline"
		if n.Online {
			state = "online"
		}
		line := fmt.Sprintf("%s, %s; NAT keepalive %s", state, n.State, n.Keepalive)
		if !n.Last.IsZero() {
			line += fmt.Sprintf("; last change %s (%s)", n.Last.Format(time.RFC3339), strings.Join(n.Reasons, "; "))
			if n.Took != "" {
				line += ", followed in " + n.Took
			}
		}
		fmt.Fprintf(w, "network    %s\n", line)
	}
	if ps := st.Paths; ps != nil {
		nat := "NAT: " + ps.NATText
		if len(ps.Reflexive) > 0 {
			nat += fmt.Sprintf(" (reflexive %s)", ps.Reflexive[0])
		}
		fmt.Fprintf(w, "paths      %s\n", nat)
		if ps.Relay.IsValid() {
			fmt.Fprintf(w, "relay      %s\n", ps.Relay)
		}
		var cs []string
		for _, c := range ps.Candidates {
			cs = append(cs, c.String())
		}
		if len(cs) > 0 {
			fmt.Fprintf(w, "candidates %s\n", strings.Join(cs, " "))
		}
		if ps.LastError != "" {
			fmt.Fprintf(w, "           last path error: %s\n", ps.LastError)
		}
		if rt := ps.RelayTCP; rt != nil {
			state := "connecting"
			if rt.Bridge.Up {
				state = "up since " + rt.Bridge.Since.Format(time.RFC3339)
			}
			fmt.Fprintf(w, "relay-tcp  UDP blocked: TLS stream to %s (%s) %s; btmmd carries the data (Go bridge), %d peer(s); frames out %d in %d, dropped %d, reconnects %d\n",
				rt.Server.Name, rt.Server.Addr, state, len(rt.Peers), rt.Bridge.FramesOut, rt.Bridge.FramesIn, rt.Bridge.Dropped, rt.Bridge.Reconnects)
			fmt.Fprintf(w, "           ESP in TCP (RFC 8229) in this kernel: %s\n", rt.ESPInTCP)
			if rt.Bridge.LastError != "" {
				fmt.Fprintf(w, "           last stream error: %s\n", rt.Bridge.LastError)
			}
		}
	}
	r := st.Register
	reg := "not published"
	if r.Published {
		reg = fmt.Sprintf("published on %s, lease %s", r.Server, r.Lease)
		if !r.LeaseEchoed {
			reg += " (assumed: server echoed no lease)"
		}
	}
	if r.LastError != "" {
		reg += fmt.Sprintf("; %d failures, last: %s", r.Failures, r.LastError)
	}
	if r.AcceptUnsigned {
		reg += "; UNSIGNED answers accepted (dns.accept_unsigned)"
	}
	fmt.Fprintf(w, "dns        %s\n", reg)
	if l := st.LLQ; l != nil {
		fmt.Fprintf(w, "llq        %s\n", llqLine(l))
	}
	if n := st.Names; n != nil {
		line := n.Mechanism + ": " + n.Detail
		if n.Why != "" {
			line += " (" + n.Why + ")"
		}
		if n.Error != "" {
			line += "; error: " + n.Error
		}
		fmt.Fprintf(w, "names      %s\n", line)
	}
	if st.LastError != "" {
		fmt.Fprintf(w, "error      dataplane: %s\n", st.LastError)
	}
	if r := st.Repair; r != nil {
		if r.Count > 0 {
			fmt.Fprintf(w, "repaired   %d times, last %s: %s\n", r.Count, r.At.Format(time.RFC3339), strings.Join(r.What, "; "))
		}
		if r.Err != "" {
			fmt.Fprintf(w, "repair     last attempt failed: %s\n", r.Err)
		}
	}
	for _, c := range st.Conflicts {
		fmt.Fprintf(w, "conflict   ULA %s is claimed by %s: keyed with none of them (one of these hosts publishes another's address)\n",
			c.ULA, strings.Join(c.Names, ", "))
	}
	if k := st.KeyingStats; k != nil && (k.BadMAC1+k.RateLimited+k.CookiesSent+k.OldVersion > 0) {
		fmt.Fprintf(w, "handshake  %d datagrams: %d failed the cheap check, %d rate-limited, %d cookies sent, %d old-version INITs refused\n",
			k.Datagrams, k.BadMAC1, k.RateLimited, k.CookiesSent, k.OldVersion)
	}
	if len(st.Peers) > 0 {
		n := map[string]int{}
		for _, p := range st.Peers {
			n[p.Health.State]++
		}
		var parts []string
		for _, s := range []string{agent.HealthOK, agent.HealthStale, agent.HealthUnreachable} {
			if n[s] > 0 {
				parts = append(parts, fmt.Sprintf("%d %s", n[s], s))
			}
		}
		fmt.Fprintf(w, "peers      %d: %s\n", len(st.Peers), strings.Join(parts, ", "))
	}
	fmt.Fprintf(w, "uptime     %s\n\n", st.Uptime)
}

// llqLine sums up the LLQ client: how many questions are pushed, how many
// polled and why.
func llqLine(l *llqclient.Status) string {
	pushed := 0
	var reasons []string
	for _, q := range l.Queries {
		if q.Mode == llqclient.ModeLLQ {
			pushed++
		}
		if q.Reason != "" && !slices.Contains(reasons, q.Reason) {
			reasons = append(reasons, q.Reason)
		}
	}
	line := fmt.Sprintf("%d questions on %s: %d pushed, %d polling", len(l.Queries), l.Server, pushed, l.Polling)
	if len(reasons) > 0 {
		line += " (" + strings.Join(reasons, "; ") + ")"
	}
	if l.AcceptUnsigned {
		line += "; UNSIGNED answers and events accepted (dns.accept_unsigned)"
	}
	return line
}

// Table cells are one line and short; `btmmctl status PEER` and --json
// have the whole text.
const (
	errCell    = 48
	reasonCell = 40
)

func printPeers(w io.Writer, st *agent.Status, now time.Time) {
	if len(st.Peers) == 0 {
		fmt.Fprintln(w, "no peers yet")
		return
	}
	counters := map[string]string{}
	for _, c := range st.Counters {
		counters[c.ULA.String()] = fmt.Sprintf("tx %d/%dB rx %d/%dB drop %d", c.TxPackets, c.TxBytes, c.RxPackets, c.RxBytes, c.Drops)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tULA\tHEALTH\tPATH\tOUTER\tFROM\tKEYS\tHANDSHAKE\tRECEIVED\tCOUNTERS")
	long := false
	for _, p := range st.Peers {
		keys := "-"
		if p.Keyed {
			keys = fmt.Sprintf("out 0x%08x in 0x%08x", p.OutSPI, p.InSPI)
		} else if p.KeyingError != "" {
			keys = "error: " + shorten(p.KeyingError, errCell)
			long = long || len(oneLine(p.KeyingError)) > errCell
		}
		health := p.Health.State
		if health == "" {
			health = "-"
		}
		if p.Health.Reason != "" && health != agent.HealthOK {
			health += ": " + shorten(p.Health.Reason, reasonCell)
			long = long || len(oneLine(p.Health.Reason)) > reasonCell
		}
		kind := "-"
		if p.Path.IsValid() {
			kind = p.Path.Kind.String()
			if p.Path.Kind == path.KindRelayTCP {
				kind += " (btmmd carries it)"
			}
		} else if p.Outer.IsValid() {
			kind = "direct" // no path selection: the peer's outer endpoint
		}
		outer, from := "-", p.OuterBy
		if p.Outer.IsValid() {
			outer = p.Outer.String()
		}
		if t, ok := (&controlplane.Peer{Tunnels: p.Tunnels}).Tunnel(p.Via); ok && p.Via != controlplane.PathESPInUDP {
			// A tunnel path (issue 15): its device and remote endpoint.
			kind, outer, from = fmt.Sprintf("%v dev %s", p.Via, p.Device), t.Remote.String(), "path"
			if t.Remote.Port() == 0 {
				outer = t.Remote.Addr().String()
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.ULA, health, kind, outer, from, keys,
			agoText(now, p.Health.LastHandshake), agoText(now, p.Health.LastReceived), counters[p.ULA.String()])
	}
	tw.Flush()
	if long {
		fmt.Fprintln(w, "(shortened: btmmctl status PEER shows the whole text)")
	}
}

// agoText is "12s ago", "-" for never.
func agoText(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now.Sub(t)
	if d < 0 {
		d = 0
	}
	if d < time.Minute {
		return d.Round(time.Second).String() + " ago"
	}
	return d.Round(time.Minute).String() + " ago"
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// peerCommand is `btmmctl status PEER`: everything about one peer, no text shortened.
func peerCommand(st *agent.Status, name string, asJSON bool, now time.Time, stdout, stderr io.Writer) int {
	domain := strings.TrimSuffix(st.Domain, ".")
	want := strings.TrimSuffix(strings.TrimSuffix(strings.ToLower(name), "."), "."+strings.ToLower(domain))
	i := slices.IndexFunc(st.Peers, func(p agent.PeerStatus) bool {
		return strings.EqualFold(p.Name, want) || p.ULA.String() == name
	})
	if i < 0 {
		var names []string
		for _, p := range st.Peers {
			names = append(names, p.Name)
		}
		fmt.Fprintf(stderr, "btmmctl: no peer %q (peers: %s)\n", name, strings.Join(names, ", "))
		return 1
	}
	pj := peersJSON(st, now)[i]
	if asJSON {
		writeJSON(stdout, pj)
		return 0
	}
	p := st.Peers[i]
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	line := func(k, f string, a ...any) { fmt.Fprintf(tw, "%s\t%s\n", k, fmt.Sprintf(f, a...)) }
	line("peer", "%s (%s)", pj.FQDN, p.ULA)
	h := p.Health
	line("health", "%s", h.State)
	if h.Reason != "" {
		line("  reason", "%s", oneLine(h.Reason))
	}
	if !h.Since.IsZero() {
		line("  since", "%s (%s)", h.Since.Format(time.RFC3339), agoText(now, h.Since))
	}
	line("handshake", "%s", stamp(now, h.LastHandshake))
	line("received", "%s", stamp(now, h.LastReceived))
	line("sent", "%s", stamp(now, h.LastSent))
	outer := "unknown"
	if p.Outer.IsValid() {
		outer = fmt.Sprintf("%s (from %s, since %s)", p.Outer, p.OuterBy, p.OuterAt.Format(time.RFC3339))
	}
	line("outer", "%s", outer)
	if pj.Path != nil {
		line("path", "%s %s -> %s", pj.Path.Kind, orDash(pj.Path.Local), pj.Path.Remote)
	}
	if p.Keyed {
		line("keys", "out 0x%08x in 0x%08x %s, keyed %s", p.OutSPI, p.InSPI, p.Cipher, p.KeyedAt.Format(time.RFC3339))
	} else {
		line("keys", "none")
	}
	if p.KeyingError != "" {
		line("keying error", "%s", oneLine(p.KeyingError))
	}
	line("in kernel", "%v", p.InKernel)
	if c := pj.Counters; c != nil && c.Error == "" {
		line("counters", "tx %d packets %d bytes, rx %d packets %d bytes, %d dropped", c.TxPackets, c.TxBytes, c.RxPackets, c.RxBytes, c.Drops)
	} else if c != nil {
		line("counters", "unavailable: %s", c.Error)
	}
	if a := p.Activity; a != nil && a.Keepalives > 0 {
		line("keepalives", "%d sent, last %s", a.Keepalives, stamp(now, a.LastKeepalive))
	}
	c := p.Capabilities
	if c.Device != "" || len(c.Dataplanes) > 0 {
		line("peer runs", "%s, dataplanes %s, keying port %d", c.Device, strings.Join(c.Dataplanes, " "), c.KeyingPort)
	}
	if c.NAT != "" {
		line("peer NAT", "%s", c.NAT)
	}
	for _, cand := range c.Candidates {
		line("candidate", "%s", cand)
	}
	tw.Flush()
	return 0
}

func stamp(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return t.Format(time.RFC3339) + " (" + agoText(now, t) + ")"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// pingCommand is `btmmctl ping`: count echoes (0: until interrupted), one
// line each, then a summary; exit 0 if any reply came.
func pingCommand(sock, peer string, count int, interval, wait time.Duration, asJSON bool, stdout, stderr io.Writer) int {
	ctx, stop := interrupted()
	defer stop()
	sent, got := 0, 0
	var rtts []time.Duration
	for seq := 1; count == 0 || seq <= count; seq++ {
		if seq > 1 {
			select {
			case <-ctx.Done():
			case <-time.After(interval):
			}
		}
		if ctx.Err() != nil {
			break
		}
		rctx, cancel := context.WithTimeout(ctx, wait+5*time.Second)
		r, err := agent.FetchPing(rctx, sock, peer, seq, wait)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			fmt.Fprintln(stderr, "btmmctl:", err)
			return 1
		}
		sent++
		if asJSON {
			json.NewEncoder(stdout).Encode(pingJSON(r))
		} else {
			fmt.Fprintln(stdout, pingLine(r))
		}
		if r.Error == "" {
			got++
			rtts = append(rtts, r.RTT)
		}
	}
	if !asJSON && sent > 0 {
		fmt.Fprintf(stdout, "--- %s: %d echoes, %d replies", peer, sent, got)
		if len(rtts) > 0 {
			slices.Sort(rtts)
			fmt.Fprintf(stdout, ", rtt min/median/max %s/%s/%s", ms(rtts[0]), ms(rtts[len(rtts)/2]), ms(rtts[len(rtts)-1]))
		}
		fmt.Fprintln(stdout)
	}
	if got == 0 {
		return 1
	}
	return 0
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }

// pingLine is one echo in words: who answered, in how long, over which path.
func pingLine(r *agent.PingResult) string {
	via := "no path"
	if r.Path.IsValid() {
		via = fmt.Sprintf("via %s %s -> %s", r.Path.Kind, orDash(addrPort(r.Path.Local)), r.Path.Remote)
		if r.External.IsValid() && r.Path.Local.IsValid() && r.External != r.Path.Local {
			via += fmt.Sprintf(" (we are %s to it)", r.External)
		}
	}
	if r.Error != "" {
		return fmt.Sprintf("%s (%s) seq %d: %s; %s", r.Peer, r.ULA, r.Seq, r.Error, via)
	}
	line := fmt.Sprintf("pong from %s (%s) seq %d in %s %s", r.Peer, r.ULA, r.Seq, ms(r.RTT), via)
	if r.PathProbeRTT > 0 {
		line += fmt.Sprintf(", path probe %s", ms(r.PathProbeRTT))
	}
	if !r.InTunnel {
		line += "; the tunnel's counters did not move (the reply took another route?)"
	}
	return line
}

// watchCommand is `btmmctl watch`: btmmd's events until interrupted.
func watchCommand(sock string, asJSON bool, stdout, stderr io.Writer) int {
	ctx, stop := interrupted()
	defer stop()
	err := agent.WatchEvents(ctx, sock, func(e agent.Event) error {
		if asJSON {
			return json.NewEncoder(stdout).Encode(eventJSON(e))
		}
		_, err := fmt.Fprintf(stdout, "%s %s\n", e.Time.Format("15:04:05.000"), e)
		return err
	})
	if err != nil {
		fmt.Fprintln(stderr, "btmmctl:", err)
		return 1
	}
	return 0
}
