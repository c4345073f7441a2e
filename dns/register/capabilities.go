package register

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// ProtocolVersion is the version of the TXT record layout and of the
// btmm peer protocol this agent speaks.
const ProtocolVersion = 1

// Capabilities is what a host tells its peers in its TXT record (RFC 6281
// §5.2: "a TXT RR for describing the autotunnel device information"), as
// DNS-SD key=value strings (RFC 6763 §6):
//
//	txtvers=1  proto=<Version>  dev=<Device>  dp=<Dataplanes,comma-separated>
//	kport=<KeyingPort>  krb=<Principal>
//	pk=<ProbeKey, base64url>  nat=<NAT>  c-<kind>=<addr:port>[,<addr:port>...]
//
// The c-<kind> keys list endpoint candidates (docs/paths.md): where else
// than the SRV/A endpoint this host's tunnel port may be reached, e.g.
// c-lan (its own LAN addresses), c-rfx (reflexive, as a STUN responder saw
// it), c-relay (its relay allocation). Every c- key has that grammar, so a
// kind this version does not know is still parsed and passed on.
//
// Unknown keys are ignored (a newer peer may add some); of repeated keys the
// first counts (RFC 6763 §6.4). A host that publishes none of the newer keys
// (pk, nat, c-*) is a peer with one candidate: its SRV/A endpoint.
type Capabilities struct {
	Version    int      // btmm protocol version (ProtocolVersion)
	Device     string   // free-form device info, e.g. "linux/amd64 btmmd v0.1"
	Dataplanes []string // e.g. "xfrm", "ebpf": the tunnel dataplanes this host can run
	KeyingPort uint16   // UDP port of the Kerberos-authenticated key exchange
	Principal  string   // Kerberos principal of the host, e.g. "host/laptop.alice.btmm.example@BTMM.EXAMPLE"
	// ProbeKey is the host's public key for connectivity probes (32 bytes,
	// X25519); empty when it does not probe.
	ProbeKey []byte
	// NAT is the host's own view of its NAT's mapping behaviour ("eim",
	// "symmetric", "none", "blocked"), informational.
	NAT string
	// Candidates are endpoint candidates, in the order published.
	Candidates []Candidate
}

// Candidate is one place a host's tunnel port may be reached, published as
// c-<Kind>=<Addr>.
type Candidate struct {
	Kind string // lower-case letters and digits: "lan", "rfx", "relay", ...
	Addr netip.AddrPort
}

func (c Candidate) String() string { return c.Kind + "/" + c.Addr.String() }

func validKind(k string) bool {
	if k == "" || len(k) > 16 {
		return false
	}
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

// TXT renders c as TXT strings, in a fixed order.
func (c Capabilities) TXT() []string {
	out := []string{"txtvers=1", "proto=" + strconv.Itoa(c.Version)}
	if c.Device != "" {
		out = append(out, "dev="+c.Device)
	}
	if len(c.Dataplanes) > 0 {
		out = append(out, "dp="+strings.Join(c.Dataplanes, ","))
	}
	if c.KeyingPort != 0 {
		out = append(out, "kport="+strconv.Itoa(int(c.KeyingPort)))
	}
	if c.Principal != "" {
		out = append(out, "krb="+c.Principal)
	}
	if len(c.ProbeKey) > 0 {
		out = append(out, "pk="+base64.RawURLEncoding.EncodeToString(c.ProbeKey))
	}
	if c.NAT != "" {
		out = append(out, "nat="+c.NAT)
	}
	// One string per kind, kinds in order of first appearance.
	var kinds []string
	byKind := map[string][]string{}
	for _, cd := range c.Candidates {
		if _, ok := byKind[cd.Kind]; !ok {
			kinds = append(kinds, cd.Kind)
		}
		byKind[cd.Kind] = append(byKind[cd.Kind], cd.Addr.String())
	}
	for _, k := range kinds {
		out = append(out, "c-"+k+"="+strings.Join(byKind[k], ","))
	}
	return out
}

// Validate refuses capabilities that would not survive TXT encoding.
func (c Capabilities) Validate() error {
	var errs []error
	if c.Version < 0 {
		errs = append(errs, fmt.Errorf("capabilities: negative protocol version %d", c.Version))
	}
	for _, d := range c.Dataplanes {
		if d == "" || strings.ContainsAny(d, ", \t") {
			errs = append(errs, fmt.Errorf("capabilities: dataplane name %q is empty or has a comma/space", d))
		}
	}
	if n := len(c.ProbeKey); n != 0 && n != 32 {
		errs = append(errs, fmt.Errorf("capabilities: probe key is %d bytes, want 32", n))
	}
	if c.NAT != "" && !validKind(c.NAT) {
		errs = append(errs, fmt.Errorf("capabilities: NAT %q is not a lower-case word", c.NAT))
	}
	seen := map[Candidate]bool{}
	for _, cd := range c.Candidates {
		if !validKind(cd.Kind) {
			errs = append(errs, fmt.Errorf("capabilities: candidate kind %q is not 1-16 lower-case letters or digits", cd.Kind))
		}
		if !cd.Addr.IsValid() || cd.Addr.Port() == 0 || cd.Addr.Addr().Zone() != "" {
			errs = append(errs, fmt.Errorf("capabilities: candidate %s: not an address:port", cd))
		}
		if seen[cd] {
			errs = append(errs, fmt.Errorf("capabilities: candidate %s listed twice", cd))
		}
		seen[cd] = true
	}
	for _, s := range c.TXT() {
		if len(s) > 255 {
			errs = append(errs, fmt.Errorf("capabilities: TXT string %.20q... longer than 255 bytes", s))
		}
	}
	return errors.Join(errs...)
}

// ParseCapabilities reads the TXT strings of a peer. It fails only on a
// malformed value of a key it knows; unknown keys are skipped.
func ParseCapabilities(txt []string) (Capabilities, error) {
	var c Capabilities
	seen := map[string]bool{}
	for _, s := range txt {
		k, v, _ := strings.Cut(s, "=")
		k = strings.ToLower(k)
		if k == "" || seen[k] {
			continue
		}
		seen[k] = true
		switch k {
		case "txtvers":
			if v != "1" {
				return Capabilities{}, fmt.Errorf("parse capabilities: txtvers=%q, want 1", v)
			}
		case "proto":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return Capabilities{}, fmt.Errorf("parse capabilities: proto=%q is not a version number", v)
			}
			c.Version = n
		case "dev":
			c.Device = v
		case "dp":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" && !slices.Contains(c.Dataplanes, d) {
					c.Dataplanes = append(c.Dataplanes, d)
				}
			}
		case "kport":
			n, err := strconv.ParseUint(v, 10, 16)
			if err != nil || n == 0 {
				return Capabilities{}, fmt.Errorf("parse capabilities: kport=%q is not a port", v)
			}
			c.KeyingPort = uint16(n)
		case "krb":
			c.Principal = v
		case "pk":
			b, err := base64.RawURLEncoding.DecodeString(v)
			if err != nil || len(b) != 32 {
				return Capabilities{}, fmt.Errorf("parse capabilities: pk=%q is not a 32-byte base64url key", v)
			}
			c.ProbeKey = b
		case "nat":
			if !validKind(v) {
				return Capabilities{}, fmt.Errorf("parse capabilities: nat=%q is not a lower-case word", v)
			}
			c.NAT = v
		default:
			kind, ok := strings.CutPrefix(k, "c-")
			if !ok {
				continue
			}
			if !validKind(kind) {
				return Capabilities{}, fmt.Errorf("parse capabilities: %q is not a candidate kind", k)
			}
			for _, a := range strings.Split(v, ",") {
				ap, err := netip.ParseAddrPort(a)
				if err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" {
					return Capabilities{}, fmt.Errorf("parse capabilities: %s=%q: %q is not an address:port", k, v, a)
				}
				cd := Candidate{Kind: kind, Addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
				if !slices.Contains(c.Candidates, cd) {
					c.Candidates = append(c.Candidates, cd)
				}
			}
		}
	}
	return c, nil
}

// Equal reports whether two capability sets are the same.
func (c Capabilities) Equal(o Capabilities) bool {
	return c.Version == o.Version && c.Device == o.Device && c.KeyingPort == o.KeyingPort &&
		c.Principal == o.Principal && slices.Equal(c.Dataplanes, o.Dataplanes) &&
		string(c.ProbeKey) == string(o.ProbeKey) && c.NAT == o.NAT && slices.Equal(c.Candidates, o.Candidates)
}
