// Command btmmctl: see the usage text below (`btmmctl --help`).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/btmm/btmm/cmd/internal/cli"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/dns/llqclient"
)

const synopsis = `btmmctl: inspect a running btmmd.

Usage: btmmctl [flags] <command>

Commands:
  status   this host: identity, NAT mapping, registration, dataplane, peers
  peers    the user's other hosts: ULA, current outer address, keying, counters
  netcheck kernel features (ESP, GCM, xfrm interfaces), btmmd's tunnel port
           and NAT mapping, DNS registration, KDC reachability
  completion
           print the bash completion script
  enroll [-dir D] [-config F] [-force] BUNDLE
           install a bundle from the server's "btmm-dnsd enroll USER HOST":
           key files (0600), krb5.conf, CA, and a working btmmd.toml

Kernel state is inspected with the kernel's own tools: ip xfrm state,
ip xfrm policy, ip -6 route show proto 98 (btmm's routes), bpftool map dump pinned /sys/fs/bpf/btmm/...`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmmctl", synopsis)
	sock := fs.String("socket", agent.DefaultControlSocket, "btmmd's control socket")
	asJSON := fs.Bool("json", false, "print JSON (snake_case keys, durations in seconds)")
	krb5Conf := fs.String("krb5-conf", "/etc/btmm/krb5.conf", "netcheck: the krb5.conf whose KDCs to try")
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	cmd := "status"
	if fs.NArg() > 0 {
		cmd = fs.Arg(0)
	}
	if cmd == "enroll" {
		return enrollCommand(fs.Args()[1:], os.Stdin, stdout, stderr)
	}
	if cmd == "netcheck" {
		printNetcheck(stdout, netcheck(*sock, *krb5Conf), *asJSON)
		return 0
	}
	if cmd == "completion" {
		io.WriteString(stdout, bashCompletion)
		return 0
	}
	if cmd != "status" && cmd != "peers" {
		fmt.Fprintf(stderr, "btmmctl: unknown command %q (try --help)\n", cmd)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := agent.FetchStatus(ctx, *sock)
	if err != nil {
		fmt.Fprintln(stderr, "btmmctl:", err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(st)
		return 0
	}
	if cmd == "status" {
		printStatus(stdout, st)
	}
	printPeers(stdout, st)
	return 0
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

func printPeers(w io.Writer, st *agent.Status) {
	if len(st.Peers) == 0 {
		fmt.Fprintln(w, "no peers yet")
		return
	}
	counters := map[string]string{}
	for _, c := range st.Counters {
		counters[c.ULA.String()] = fmt.Sprintf("tx %d/%dB rx %d/%dB drop %d", c.TxPackets, c.TxBytes, c.RxPackets, c.RxBytes, c.Drops)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tULA\tPATH\tOUTER\tFROM\tKEYS\tIN KERNEL\tCOUNTERS")
	for _, p := range st.Peers {
		keys := "-"
		if p.Keyed {
			keys = fmt.Sprintf("out 0x%08x in 0x%08x", p.OutSPI, p.InSPI)
		} else if p.KeyingError != "" {
			keys = "error: " + p.KeyingError
		}
		kind := "-" // no path selection for this peer (it publishes no probe key)
		if p.Path.IsValid() {
			kind = p.Path.Kind.String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%v\t%s\n", p.Name, p.ULA, kind, p.Outer, p.OuterBy, keys, p.InKernel, counters[p.ULA.String()])
	}
	tw.Flush()
}
