// Package enroll is the enrollment bundle that `btmm-dnsd enroll` prints on
// the server and `btmmctl enroll` installs on a new host: everything btmmd
// needs to join the user's hosts (the rendezvous server's address, the
// host's TSIG key, the DoT CA, and a Kerberos keytab or the user's
// pre-shared key). The bundle holds secrets: it is meant to be moved once,
// over a channel you trust (scp, a USB stick), and deleted.
//
// Wire format: one comment line, the line "btmm-enroll-v1", then the
// standard base64 of a JSON object (Bundle), wrapped at 76 columns. Text, so
// it survives copy and paste; versioned, so a newer format is refused
// clearly.
package enroll

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/miekg/dns"
)

// Magic is the bundle's format line.
const Magic = "btmm-enroll-v1"

// Bundle is one host's enrollment.
type Bundle struct {
	Host    string `json:"host"`              // the host's label, e.g. "laptop"
	Domain  string `json:"domain"`            // the user's domain, e.g. "alice.btmm.example."
	Zone    string `json:"zone"`              // the server's zone, e.g. "btmm.example."
	Server  string `json:"server"`            // update/LLQ server HOST:PORT
	TLSPort uint16 `json:"tls_port,omitzero"` // DNS over TLS port, 0: none
	CAPEM   string `json:"ca_pem,omitempty"`  // certificate(s) to verify the server's TLS with
	// TSIGKey is the host's key in BIND syntax (`btmm-dnsd addhost`).
	TSIGKey string `json:"tsig_key"`
	// Kerberos keying: the host's keytab (from kadmin ktadd) and what
	// krb5.conf needs.
	Realm     string `json:"realm,omitempty"`
	KDC       string `json:"kdc,omitempty"`       // HOST[:PORT]
	Principal string `json:"principal,omitempty"` // host/<host>.<domain>@REALM
	Keytab    []byte `json:"keytab,omitempty"`
	// PSK keying: the user's pre-shared key (when no KDC is configured).
	PSK []byte `json:"psk,omitempty"`
}

// Check reports everything wrong with b at once.
func (b *Bundle) Check() error {
	var errs []error
	if _, ok := dns.IsDomainName(b.Host); !ok || b.Host == "" || strings.Contains(b.Host, ".") {
		errs = append(errs, fmt.Errorf("host %q is not one DNS label", b.Host))
	}
	if _, ok := dns.IsDomainName(b.Domain); !ok || !dns.IsFqdn(b.Domain) || b.Domain == "." {
		errs = append(errs, fmt.Errorf("domain %q is not a fully qualified name", b.Domain))
	}
	if _, ok := dns.IsDomainName(b.Zone); !ok || !dns.IsFqdn(b.Zone) || !dns.IsSubDomain(b.Zone, b.Domain) {
		errs = append(errs, fmt.Errorf("zone %q does not contain domain %q", b.Zone, b.Domain))
	}
	if _, err := netip.ParseAddrPort(b.Server); err != nil {
		if h, p, ok := strings.Cut(b.Server, ":"); !ok || h == "" || p == "" {
			errs = append(errs, fmt.Errorf("server %q: want HOST:PORT", b.Server))
		}
	}
	if !strings.Contains(b.TSIGKey, "secret") {
		errs = append(errs, errors.New("no TSIG key"))
	}
	kerberos, psk := len(b.Keytab) > 0 || b.Realm != "", len(b.PSK) > 0
	switch {
	case kerberos && psk:
		errs = append(errs, errors.New("both a keytab and a pre-shared key: pick one keying mode"))
	case kerberos && (len(b.Keytab) == 0 || b.Realm == "" || b.Principal == ""):
		errs = append(errs, errors.New("kerberos keying needs realm, principal and keytab"))
	case !kerberos && !psk:
		errs = append(errs, errors.New("no keying material: neither a keytab nor a pre-shared key"))
	}
	return errors.Join(errs...)
}

// Marshal renders b in the wire format.
func (b *Bundle) Marshal() ([]byte, error) {
	if err := b.Check(); err != nil {
		return nil, fmt.Errorf("enroll: bundle: %w", err)
	}
	js, err := json.Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("enroll: bundle: %w", err)
	}
	enc := base64.StdEncoding.EncodeToString(js)
	var out bytes.Buffer
	fmt.Fprintf(&out, "# btmm enrollment for %s.%s — contains secrets: move it once, then delete it\n%s\n", b.Host, strings.TrimSuffix(b.Domain, "."), Magic)
	for len(enc) > 76 {
		out.WriteString(enc[:76] + "\n")
		enc = enc[76:]
	}
	out.WriteString(enc + "\n")
	return out.Bytes(), nil
}

// ErrFormat is returned for text that is not a bundle of this version.
var ErrFormat = errors.New("not a btmm enrollment bundle (" + Magic + ")")

// Parse reads a bundle; comment lines (#) and blank lines are ignored.
func Parse(data []byte) (*Bundle, error) {
	var lines []string
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}
	if len(lines) < 2 || lines[0] != Magic {
		if len(lines) > 0 && strings.HasPrefix(lines[0], "btmm-enroll-") {
			return nil, fmt.Errorf("enroll: %w: found version %q (a newer btmmctl reads it)", ErrFormat, lines[0])
		}
		return nil, fmt.Errorf("enroll: %w", ErrFormat)
	}
	js, err := base64.StdEncoding.DecodeString(strings.Join(lines[1:], ""))
	if err != nil {
		return nil, fmt.Errorf("enroll: %w: %w", ErrFormat, err)
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	var b Bundle
	if err := dec.Decode(&b); err != nil {
		return nil, fmt.Errorf("enroll: %w: %w", ErrFormat, err)
	}
	if err := b.Check(); err != nil {
		return nil, fmt.Errorf("enroll: bundle: %w", err)
	}
	return &b, nil
}
