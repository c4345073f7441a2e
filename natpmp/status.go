package natpmp

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// State is where the client stands with the gateway.
type State int

// States. StateMapped, StatePublic and StateNoGateway publish an address.
const (
	StateStarting  State = iota // looking for the gateway
	StateMapped                 // the gateway answered; see Mappings
	StatePublic                 // our own address is public: no NAT, nothing to map
	StateNoGateway              // nothing answered the whole schedule: treated as a public network (RFC 6281 §4.1)
	StateDoubleNAT              // the gateway's external address is private or CGNAT (RFC 6281 §4.4.1)
	StateFailed                 // no route, or the gateway refused
	StateStopped                // Run returned
)

var stateNames = [...]string{"starting", "mapped", "public address, no NAT", "no gateway (treated as a public network)",
	"double NAT: no direct inbound path", "failed", "stopped"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// Mapping is one mapping as the gateway granted it.
type Mapping struct {
	Protocol     Protocol
	InternalPort uint16
	ExternalPort uint16 // 0 while not mapped
	Lifetime     time.Duration
	Expires      time.Time
	Err          string // why the gateway refused, if it did
}

// Status is the client's view of the NAT for the control plane and humans.
type Status struct {
	State    State
	Protocol string // "PCP" or "NAT-PMP" when a gateway answered
	Gateway  netip.Addr
	Local    netip.Addr
	// External is the address to publish: the gateway's external address
	// (StateMapped) or our own (StatePublic, and StateNoGateway, where RFC
	// 6281 §4.1 proceeds as on a public network); invalid otherwise,
	// notably under double NAT, where publishing it could not work.
	External netip.Addr
	Epoch    uint32    // the gateway's epoch (seconds since its state began)
	Answered time.Time // when the gateway last answered
	Resets   int       // times the gateway was seen to lose its mappings (epoch went back)
	Mappings []Mapping
	Detail   string    // why, for the unhappy states
	Since    time.Time // when the published part last changed
}

// Endpoint returns the external address and port to publish for the
// mapping of internal port on p, if there is a usable one.
func (s Status) Endpoint(p Protocol, internal uint16) (netip.AddrPort, bool) {
	switch s.State {
	case StatePublic, StateNoGateway:
		return netip.AddrPortFrom(s.External, internal), s.External.IsValid()
	case StateMapped:
		if !s.External.IsValid() {
			return netip.AddrPort{}, false
		}
		for _, m := range s.Mappings {
			if m.Protocol == p && m.InternalPort == internal && m.ExternalPort != 0 {
				return netip.AddrPortFrom(s.External, m.ExternalPort), true
			}
		}
	}
	return netip.AddrPort{}, false
}

func (s Status) String() string {
	var b strings.Builder
	state := s.State.String()
	if s.State == StateMapped && !slices.ContainsFunc(s.Mappings, func(m Mapping) bool { return m.ExternalPort != 0 }) {
		state = "not mapped"
	}
	b.WriteString(state)
	if s.Protocol != "" {
		fmt.Fprintf(&b, " via %s gateway %v", s.Protocol, s.Gateway)
	} else if s.Gateway.IsValid() {
		fmt.Fprintf(&b, " (gateway %v)", s.Gateway)
	}
	if s.External.IsValid() {
		fmt.Fprintf(&b, ", external %v", s.External)
	}
	for _, m := range s.Mappings {
		if m.ExternalPort != 0 {
			fmt.Fprintf(&b, ", %v %d->%d (%v)", m.Protocol, m.ExternalPort, m.InternalPort, m.Lifetime)
		} else {
			fmt.Fprintf(&b, ", %v %d unmapped", m.Protocol, m.InternalPort)
		}
	}
	if s.Detail != "" {
		fmt.Fprintf(&b, ": %s", s.Detail)
	}
	return b.String()
}

func (s Status) clone() Status {
	s.Mappings = slices.Clone(s.Mappings)
	return s
}

// samePublished compares what the control plane acts on: the state, the
// external address and the external ports.
func (s Status) samePublished(o Status) bool {
	if s.State != o.State || s.External != o.External || s.Gateway != o.Gateway || len(s.Mappings) != len(o.Mappings) {
		return false
	}
	for i := range s.Mappings {
		a, b := s.Mappings[i], o.Mappings[i]
		if a.Protocol != b.Protocol || a.InternalPort != b.InternalPort || a.ExternalPort != b.ExternalPort {
			return false
		}
	}
	return true
}
