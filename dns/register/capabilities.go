package register

import (
	"errors"
	"fmt"
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
//
// Unknown keys are ignored (a newer peer may add some); of repeated keys the
// first counts (RFC 6763 §6.4).
type Capabilities struct {
	Version    int      // btmm protocol version (ProtocolVersion)
	Device     string   // free-form device info, e.g. "linux/amd64 btmmd v0.1"
	Dataplanes []string // e.g. "xfrm", "ebpf": the tunnel dataplanes this host can run
	KeyingPort uint16   // UDP port of the Kerberos-authenticated key exchange
	Principal  string   // Kerberos principal of the host, e.g. "host/laptop.alice.btmm.example@BTMM.EXAMPLE"
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
		}
	}
	return c, nil
}

// Equal reports whether two capability sets are the same.
func (c Capabilities) Equal(o Capabilities) bool {
	return c.Version == o.Version && c.Device == o.Device && c.KeyingPort == o.KeyingPort &&
		c.Principal == o.Principal && slices.Equal(c.Dataplanes, o.Dataplanes)
}
