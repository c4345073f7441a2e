package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jcmturner/gokrb5/v8/config"

	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/kernelprobe"
)

// Netcheck is `btmmctl netcheck --json` (schema: docs/btmmd.md).
type Netcheck struct {
	Schema int      `json:"schema"`
	Kernel []Check  `json:"kernel"`
	Btmmd  Check    `json:"btmmd"`
	NAT    *NATInfo `json:"nat,omitempty"`
	DNS    *DNSInfo `json:"dns,omitempty"`
	LLQ    *LLQInfo `json:"llq,omitempty"`
	KDC    []Check  `json:"kdc"`
}

// LLQInfo is how btmmd follows the user's other hosts: Long-Lived Queries
// the server pushes, or polling, and why.
type LLQInfo struct {
	Mode      string `json:"mode"` // llq, polling, mixed, setup, none
	Reason    string `json:"reason,omitempty"`
	Server    string `json:"server,omitempty"`
	Questions int    `json:"questions"`
	Pushed    int    `json:"pushed"`
	Polling   int    `json:"polling"`
}

// Check is one probe's result.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// NATInfo is btmmd's view of the tunnel port's reachability.
type NATInfo struct {
	TunnelPort uint16 `json:"tunnel_port"`
	External   string `json:"external,omitempty"`
	Status     string `json:"status"` // the mapping: PCP, NAT-PMP, static, none
	BehindNAT  bool   `json:"behind_nat"`
	// Kind is the NAT's behaviour found by STUN (path selection:
	// endpoint-independent, address-dependent, ...; "unknown" without it),
	// KindText the same in words.
	Kind     string `json:"kind"`
	KindText string `json:"kind_text,omitempty"`
	// UDP: a STUN server answered over UDP (Reflexive lists the addresses
	// it saw us from); false while none answered or without path selection.
	UDP       bool     `json:"udp"`
	Reflexive []string `json:"reflexive,omitempty"`
	UDPDetail string   `json:"udp_detail,omitempty"`
}

// DNSInfo is btmmd's registration.
type DNSInfo struct {
	Server     string  `json:"server"`
	Registered bool    `json:"registered"`
	LeaseS     float64 `json:"lease_seconds"`
	LastError  string  `json:"last_error,omitempty"`
}

// netcheck probes the kernel (in throwaway namespaces), asks btmmd for its
// NAT and DNS state, and tries the KDCs of krb5Conf over TCP.
func netcheck(sock, krb5Conf string) *Netcheck {
	n := Netcheck{Schema: schemaVersion}
	for _, f := range kernelprobe.All {
		err := kernelprobe.Probe(f)
		c := Check{Name: string(f), OK: err == nil}
		if err != nil {
			c.Detail = err.Error()
		}
		n.Kernel = append(n.Kernel, c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := agent.FetchStatus(ctx, sock)
	n.Btmmd = Check{Name: "btmmd", OK: err == nil}
	if err != nil {
		n.Btmmd.Detail = err.Error()
	} else {
		n.Btmmd.Detail = fmt.Sprintf("%s.%s, dataplane %s", st.Host, strings.TrimSuffix(st.Domain, "."), st.Dataplane)
		n.NAT = &NATInfo{TunnelPort: st.TunnelPort, Status: st.NAT.Status, BehindNAT: st.NAT.BehindNAT, Kind: "unknown"}
		if st.NAT.External.IsValid() {
			n.NAT.External = st.NAT.External.String()
		}
		switch p := st.Paths; {
		case p == nil:
			n.NAT.UDPDetail = "no path selection (no STUN servers configured): NAT kind and UDP reachability unknown"
		default:
			if p.NAT != "" {
				n.NAT.Kind, n.NAT.KindText = p.NAT, p.NATText
			}
			for _, r := range p.Reflexive {
				n.NAT.Reflexive = append(n.NAT.Reflexive, r.String())
			}
			n.NAT.UDP = len(p.Reflexive) > 0
			switch {
			case n.NAT.UDP:
				n.NAT.UDPDetail = "STUN answered: seen from " + strings.Join(n.NAT.Reflexive, ", ")
			case p.LastError != "":
				n.NAT.UDPDetail = "no STUN answer: " + p.LastError
			default:
				n.NAT.UDPDetail = "no STUN answer yet"
			}
		}
		r := st.Register
		n.DNS = &DNSInfo{Server: r.Server, Registered: r.Published, LeaseS: r.Lease.Seconds(), LastError: r.LastError}
		m := agent.LLQMode(st)
		n.LLQ = &LLQInfo{Mode: m.Mode, Reason: m.Reason, Server: m.Server, Questions: m.Questions, Pushed: m.Pushed, Polling: m.Polling}
	}
	n.KDC = kdcChecks(krb5Conf)
	return &n
}

// kdcChecks dials every KDC krb5Conf names (TCP, port 88 by default).
func kdcChecks(path string) []Check {
	if _, err := os.Stat(path); err != nil {
		return []Check{{Name: path, OK: false, Detail: "no krb5.conf (PSK keying needs none)"}}
	}
	cfg, err := config.Load(path)
	if err != nil {
		return []Check{{Name: path, OK: false, Detail: err.Error()}}
	}
	var out []Check
	for _, r := range cfg.Realms {
		for _, k := range r.KDC {
			addr := k
			if _, _, err := net.SplitHostPort(k); err != nil {
				addr = net.JoinHostPort(k, "88")
			}
			c := Check{Name: r.Realm + " " + addr}
			conn, err := net.DialTimeout("tcp", addr, 3*time.Second)
			if err != nil {
				c.Detail = err.Error()
			} else {
				conn.Close()
				c.OK = true
			}
			out = append(out, c)
		}
	}
	return out
}

func printNetcheck(w io.Writer, n *Netcheck, asJSON bool) {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(n)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	mark := func(ok bool) string {
		if ok {
			return "ok"
		}
		return "NO"
	}
	for _, c := range n.Kernel {
		m := mark(c.OK)
		if c.Name == string(kernelprobe.TCX) && !c.OK {
			m = "no" // not needed: the eBPF dataplane attaches with clsact
			c.Detail = "the eBPF dataplane attaches with clsact instead; " + c.Detail
		}
		fmt.Fprintf(tw, "kernel %s\t%s\t%s\n", c.Name, m, shorten(c.Detail, 90))
	}
	fmt.Fprintf(tw, "btmmd\t%s\t%s\n", mark(n.Btmmd.OK), shorten(n.Btmmd.Detail, 90))
	if n.NAT != nil {
		ext := n.NAT.External
		if ext == "" {
			ext = "unknown"
		}
		fmt.Fprintf(tw, "tunnel %d/udp\t%s\texternal %s (%s)\n", n.NAT.TunnelPort, mark(n.NAT.External != ""), ext, n.NAT.Status)
		kind := n.NAT.Kind
		if n.NAT.KindText != "" && n.NAT.KindText != kind {
			kind += ": " + n.NAT.KindText
		}
		if !n.NAT.BehindNAT {
			kind = "none (public address); " + kind
		}
		fmt.Fprintf(tw, "nat kind\t%s\t%s\n", mark(n.NAT.Kind != "unknown"), shorten(kind, 90))
		fmt.Fprintf(tw, "udp\t%s\t%s\n", mark(n.NAT.UDP), shorten(n.NAT.UDPDetail, 90))
	}
	if n.DNS != nil {
		d := fmt.Sprintf("server %s, lease %gs", n.DNS.Server, n.DNS.LeaseS)
		if n.DNS.LastError != "" {
			d += "; last error: " + n.DNS.LastError
		}
		fmt.Fprintf(tw, "dns registration\t%s\t%s\n", mark(n.DNS.Registered), shorten(d, 90))
	}
	if l := n.LLQ; l != nil {
		d := fmt.Sprintf("%s: %d of %d questions pushed, %d polling", l.Mode, l.Pushed, l.Questions, l.Polling)
		if l.Reason != "" {
			d += " (" + l.Reason + ")"
		}
		fmt.Fprintf(tw, "llq\t%s\t%s\n", mark(l.Mode == "llq"), shorten(d, 90))
	}
	for _, c := range n.KDC {
		fmt.Fprintf(tw, "kdc %s\t%s\t%s\n", c.Name, mark(c.OK), shorten(c.Detail, 90))
	}
	tw.Flush()
}

// shorten keeps table cells on one line and short; --json has the rest.
func shorten(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		s = s[:n-3] + "..."
	}
	return s
}
