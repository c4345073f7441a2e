package main

import (
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/path"
)

// The JSON schema of `btmmctl --json` (docs/btmmctl.md), version 1. It is
// btmmctl's own, apart from btmmd's internal status types, so that it stays
// stable while those change: snake_case keys, durations in seconds (float,
// keys ending in _seconds), times in RFC 3339 (omitted while unknown),
// addresses as text, absent optional fields omitted. Additions keep the
// version; a removed or changed key bumps it.
const schemaVersion = 1

// StatusJSON is `btmmctl status --json` (and, with only schema and peers,
// `btmmctl peers --json`).
type StatusJSON struct {
	Schema          int                `json:"schema"`
	Host            string             `json:"host,omitempty"`
	FQDN            string             `json:"fqdn,omitempty"`
	ULA             string             `json:"ula,omitempty"`
	AutotunnelLabel string             `json:"autotunnel_label,omitempty"`
	IdentitySource  string             `json:"identity_source,omitempty"`
	Dataplane       string             `json:"dataplane,omitempty"`
	Cleartext       bool               `json:"cleartext,omitempty"`
	TunnelPort      uint16             `json:"tunnel_port,omitempty"`
	UptimeSeconds   float64            `json:"uptime_seconds,omitempty"`
	NAT             *NATJSON           `json:"nat,omitempty"`
	Network         *NetworkJSON       `json:"network,omitempty"`
	Registration    *RegistrationJSON  `json:"registration,omitempty"`
	LLQ             *LLQJSON           `json:"llq,omitempty"`
	Names           *NamesJSON         `json:"names,omitempty"`
	Keying          *KeyingJSON        `json:"keying,omitempty"`
	DataplaneError  string             `json:"dataplane_error,omitempty"`
	Repair          *RepairJSON        `json:"last_repair,omitempty"`
	Conflicts       []ConflictJSON     `json:"ula_conflicts,omitempty"`
	Paths           *agent.PathsStatus `json:"-"` // shown in the text only (issue 14's own schema is not frozen yet)
	Peers           []PeerJSON         `json:"peers"`
}

// NATJSON is the tunnel port's mapping.
type NATJSON struct {
	External  string `json:"external,omitempty"`
	Status    string `json:"status"`
	BehindNAT bool   `json:"behind_nat"`
}

// NetworkJSON is this host's own network as btmmd follows it.
type NetworkJSON struct {
	Following        bool      `json:"following"`
	Online           bool      `json:"online"`
	State            string    `json:"state,omitempty"`
	MajorChanges     int       `json:"major_changes"`
	LastChange       time.Time `json:"last_change,omitzero"`
	LastReasons      []string  `json:"last_reasons,omitempty"`
	LastTookSeconds  float64   `json:"last_took_seconds,omitempty"`
	KeepaliveSeconds float64   `json:"keepalive_seconds"` // 0: NAT keepalives off
}

// RegistrationJSON is the host's records on the DNS server.
type RegistrationJSON struct {
	Server         string    `json:"server,omitempty"`
	Published      bool      `json:"published"`
	LeaseSeconds   float64   `json:"lease_seconds"`
	LeaseEchoed    bool      `json:"lease_echoed"`
	LastSuccess    time.Time `json:"last_success,omitzero"`
	NextAttempt    time.Time `json:"next_attempt,omitzero"`
	Failures       int       `json:"failures"`
	LastError      string    `json:"last_error,omitempty"`
	AcceptUnsigned bool      `json:"accept_unsigned,omitempty"`
}

// LLQJSON is how the user's other hosts are followed.
type LLQJSON struct {
	Mode           string         `json:"mode"` // llq, polling, mixed, setup, none
	Reason         string         `json:"reason,omitempty"`
	Server         string         `json:"server,omitempty"`
	LastError      string         `json:"last_error,omitempty"`
	AcceptUnsigned bool           `json:"accept_unsigned,omitempty"`
	Questions      []QuestionJSON `json:"questions,omitempty"`
}

// QuestionJSON is one watched question.
type QuestionJSON struct {
	Name         string  `json:"name"`
	Type         string  `json:"type"`
	Mode         string  `json:"mode"` // llq, polling, setup
	Reason       string  `json:"reason,omitempty"`
	LeaseSeconds float64 `json:"lease_seconds,omitempty"`
	Answers      int     `json:"answers"`
	Setups       int     `json:"setups"`
}

// NamesJSON is how the user's host names reach the system resolver.
type NamesJSON struct {
	Mechanism string `json:"mechanism"` // resolved, hosts, none
	Detail    string `json:"detail"`
	Why       string `json:"why,omitempty"`
	Error     string `json:"error,omitempty"`
}

// KeyingJSON is the key exchange's counters.
type KeyingJSON struct {
	Error            string `json:"error,omitempty"`
	Datagrams        uint64 `json:"datagrams"`
	Malformed        uint64 `json:"malformed"`
	OldVersion       uint64 `json:"old_version"`
	BadMAC1          uint64 `json:"bad_mac1"`
	RateLimited      uint64 `json:"rate_limited"`
	CookiesSent      uint64 `json:"cookies_sent"`
	InitsRefused     uint64 `json:"inits_refused"`
	InitsAccepted    uint64 `json:"inits_accepted"`
	RepliesFromCache uint64 `json:"replies_from_cache"`
}

// RepairJSON is the dataplane's last repair of kernel state.
type RepairJSON struct {
	At    time.Time `json:"at,omitzero"`
	Count int       `json:"count"`
	What  []string  `json:"what,omitempty"`
	Error string    `json:"error,omitempty"`
}

// ConflictJSON is a ULA several host names claim.
type ConflictJSON struct {
	ULA   string   `json:"ula"`
	Names []string `json:"names"`
}

// PeerJSON is one of the user's other hosts.
type PeerJSON struct {
	Name        string     `json:"name"`
	FQDN        string     `json:"fqdn,omitempty"`
	ULA         string     `json:"ula"`
	Health      HealthJSON `json:"health"`
	Outer       string     `json:"outer,omitempty"`
	OuterSource string     `json:"outer_source,omitempty"`
	OuterSince  time.Time  `json:"outer_since,omitzero"`
	Path        *PathJSON  `json:"path,omitempty"`
	Keyed       bool       `json:"keyed"`
	OutSPI      uint32     `json:"out_spi,omitempty"`
	InSPI       uint32     `json:"in_spi,omitempty"`
	Cipher      string     `json:"cipher,omitempty"`
	KeyingError string     `json:"keying_error,omitempty"`
	InKernel    bool       `json:"in_kernel"`
	Counters    *Counters  `json:"counters,omitempty"`
	// NAT keepalives sent to the peer (RFC 3948 §2.3).
	LastKeepalive time.Time `json:"last_keepalive,omitzero"`
	Keepalives    uint64    `json:"keepalives"`
	Device        string    `json:"device,omitempty"`
	Dataplanes    []string  `json:"dataplanes,omitempty"`
	PeerNAT       string    `json:"peer_nat,omitempty"`
}

// HealthJSON is a peer's liveness.
type HealthJSON struct {
	State                string    `json:"state"` // ok, stale, unreachable
	Reason               string    `json:"reason,omitempty"`
	Since                time.Time `json:"since,omitzero"`
	LastHandshake        time.Time `json:"last_handshake,omitzero"`
	LastHandshakeSeconds float64   `json:"last_handshake_seconds_ago,omitempty"`
	LastReceived         time.Time `json:"last_received,omitzero"`
	LastReceivedSeconds  float64   `json:"last_received_seconds_ago,omitempty"`
	LastSent             time.Time `json:"last_sent,omitzero"`
}

// PathJSON is how the tunnel reaches a peer.
type PathJSON struct {
	Kind   string `json:"kind"` // lan, direct, punched, relay-udp, relay-tcp
	Local  string `json:"local,omitempty"`
	Remote string `json:"remote"`
	// Carrier is who moves the peer's packets: "kernel", or "btmmd" on
	// relay-tcp (the bridge copies them between a loopback socket, the
	// local end, and the TLS stream to the relay).
	Carrier string `json:"carrier,omitempty"`
}

// pathJSON describes p; outer is the dataplane's outer address for the
// peer (a relay-tcp peer's bridge socket).
func pathJSON(p path.Path, outer netip.AddrPort) *PathJSON {
	pj := &PathJSON{Kind: p.Kind.String(), Local: addrPort(p.Local), Remote: addrPort(p.Remote), Carrier: "kernel"}
	if p.Kind == path.KindRelayTCP {
		pj.Carrier = "btmmd"
		if !p.Local.IsValid() {
			pj.Local = addrPort(outer)
		}
	}
	return pj
}

// Counters are the kernel's counters for a peer's SAs (or BPF map entry).
type Counters struct {
	TxPackets uint64 `json:"tx_packets"`
	TxBytes   uint64 `json:"tx_bytes"`
	RxPackets uint64 `json:"rx_packets"`
	RxBytes   uint64 `json:"rx_bytes"`
	Drops     uint64 `json:"drops"`
	Error     string `json:"error,omitempty"` // why they are missing
}

// PingJSON is one line of `btmmctl ping --json`.
type PingJSON struct {
	Schema              int       `json:"schema"`
	Peer                string    `json:"peer"`
	ULA                 string    `json:"ula"`
	Seq                 int       `json:"seq"`
	OK                  bool      `json:"ok"`
	RTTSeconds          float64   `json:"rtt_seconds,omitempty"`
	Path                *PathJSON `json:"path,omitempty"`
	PathProbeRTTSeconds float64   `json:"path_probe_rtt_seconds,omitempty"`
	OuterSource         string    `json:"outer_source,omitempty"`
	External            string    `json:"external,omitempty"`
	InTunnel            bool      `json:"in_tunnel"`
	Error               string    `json:"error,omitempty"`
}

// EventJSON is one line of `btmmctl watch --json`.
type EventJSON struct {
	Schema int       `json:"schema"`
	Time   time.Time `json:"time"`
	Type   string    `json:"type"`
	Peer   string    `json:"peer,omitempty"`
	From   string    `json:"from,omitempty"`
	To     string    `json:"to,omitempty"`
	Reason string    `json:"reason,omitempty"`
}

func addr(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func addrPort(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// seconds parses one of btmmd's duration texts ("262ms", "off": 0).
func seconds(s string) float64 {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0
	}
	return d.Seconds()
}

func agoSeconds(now, t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return max(now.Sub(t).Seconds(), 0)
}

// statusJSON converts btmmd's status into the schema.
func statusJSON(st *agent.Status, now time.Time) *StatusJSON {
	domain := strings.TrimSuffix(st.Domain, ".")
	out := &StatusJSON{Schema: schemaVersion, Host: st.Host, FQDN: st.Host + "." + domain, ULA: addr(st.ULA),
		AutotunnelLabel: st.Label, IdentitySource: st.IdentityBy, Dataplane: st.Dataplane,
		Cleartext: strings.Contains(st.Dataplane, "cleartext"), TunnelPort: st.TunnelPort,
		UptimeSeconds: agoSeconds(now, st.Started), DataplaneError: st.LastError, Paths: st.Paths,
		NAT: &NATJSON{External: addrPort(st.NAT.External), Status: st.NAT.Status, BehindNAT: st.NAT.BehindNAT},
	}
	n := st.Network
	out.Network = &NetworkJSON{Following: n.Following, Online: n.Online, State: n.State, MajorChanges: n.Changes,
		LastChange: n.Last, LastReasons: n.Reasons, LastTookSeconds: seconds(n.Took), KeepaliveSeconds: seconds(n.Keepalive)}
	r := st.Register
	out.Registration = &RegistrationJSON{Server: r.Server, Published: r.Published, LeaseSeconds: r.Lease.Seconds(),
		LeaseEchoed: r.LeaseEchoed, LastSuccess: r.LastSuccess, NextAttempt: r.NextAttempt, Failures: r.Failures,
		LastError: r.LastError, AcceptUnsigned: r.AcceptUnsigned}
	m := agent.LLQMode(st)
	out.LLQ = &LLQJSON{Mode: m.Mode, Reason: m.Reason, Server: m.Server}
	if l := st.LLQ; l != nil {
		out.LLQ.LastError, out.LLQ.AcceptUnsigned = l.LastError, l.AcceptUnsigned
		for _, q := range l.Queries {
			out.LLQ.Questions = append(out.LLQ.Questions, QuestionJSON{Name: q.Name, Type: q.Type, Mode: string(q.Mode),
				Reason: q.Reason, LeaseSeconds: q.Lease.Seconds(), Answers: q.Answers, Setups: q.Setups})
		}
	}
	if n := st.Names; n != nil {
		out.Names = &NamesJSON{Mechanism: n.Mechanism, Detail: n.Detail, Why: n.Why, Error: n.Error}
	}
	out.Keying = &KeyingJSON{Error: st.KeyingError}
	if k := st.KeyingStats; k != nil {
		out.Keying = &KeyingJSON{Error: st.KeyingError, Datagrams: k.Datagrams, Malformed: k.Malformed, OldVersion: k.OldVersion,
			BadMAC1: k.BadMAC1, RateLimited: k.RateLimited, CookiesSent: k.CookiesSent, InitsRefused: k.InitsRefused,
			InitsAccepted: k.InitsAccepted, RepliesFromCache: k.RepliesFromCache}
	}
	if rp := st.Repair; rp != nil {
		out.Repair = &RepairJSON{At: rp.At, Count: rp.Count, What: rp.What, Error: rp.Err}
	}
	for _, c := range st.Conflicts {
		out.Conflicts = append(out.Conflicts, ConflictJSON{ULA: c.ULA.String(), Names: c.Names})
	}
	out.Peers = peersJSON(st, now)
	return out
}

func peersJSON(st *agent.Status, now time.Time) []PeerJSON {
	domain := strings.TrimSuffix(st.Domain, ".")
	out := []PeerJSON{}
	for _, p := range st.Peers {
		h := p.Health
		pj := PeerJSON{Name: p.Name, FQDN: p.Name + "." + domain, ULA: addr(p.ULA),
			Health: HealthJSON{State: h.State, Reason: h.Reason, Since: h.Since, LastHandshake: h.LastHandshake,
				LastHandshakeSeconds: agoSeconds(now, h.LastHandshake), LastReceived: h.LastReceived,
				LastReceivedSeconds: agoSeconds(now, h.LastReceived), LastSent: h.LastSent},
			Outer: addrPort(p.Outer), OuterSource: p.OuterBy, OuterSince: p.OuterAt, Keyed: p.Keyed, OutSPI: p.OutSPI,
			InSPI: p.InSPI, Cipher: string(p.Cipher), KeyingError: p.KeyingError, InKernel: p.InKernel,
			Device: p.Capabilities.Device, Dataplanes: p.Capabilities.Dataplanes, PeerNAT: p.Capabilities.NAT}
		if p.Path.IsValid() {
			pj.Path = pathJSON(p.Path, p.Outer)
		}
		if i := slices.IndexFunc(st.Counters, func(c controlplane.PeerStats) bool { return c.ULA == p.ULA }); i >= 0 {
			c := st.Counters[i]
			pj.Counters = &Counters{TxPackets: c.TxPackets, TxBytes: c.TxBytes, RxPackets: c.RxPackets, RxBytes: c.RxBytes, Drops: c.Drops}
		} else if st.CountersError != "" {
			pj.Counters = &Counters{Error: st.CountersError}
		}
		if a := p.Activity; a != nil {
			pj.LastKeepalive, pj.Keepalives = a.LastKeepalive, a.Keepalives
		}
		out = append(out, pj)
	}
	return out
}

func pingJSON(r *agent.PingResult) PingJSON {
	pj := PingJSON{Schema: schemaVersion, Peer: r.Peer, ULA: addr(r.ULA), Seq: r.Seq, OK: r.Error == "",
		RTTSeconds: r.RTT.Seconds(), PathProbeRTTSeconds: r.PathProbeRTT.Seconds(), OuterSource: r.OuterSource,
		External: addrPort(r.External), InTunnel: r.InTunnel, Error: r.Error}
	if r.Path.IsValid() {
		pj.Path = pathJSON(r.Path, netip.AddrPort{})
	}
	return pj
}

func eventJSON(e agent.Event) EventJSON {
	return EventJSON{Schema: schemaVersion, Time: e.Time, Type: e.Type, Peer: e.Peer, From: e.From, To: e.To, Reason: e.Reason}
}
