package e2e

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/btmm/btmm/internal/lab"
)

// hostFiles names a test btmmd's files in its test's directory and its
// keying: the body of its [keying] section (keytab, krb5_conf and realm
// for Kerberos; mode = "psk" and psk_file for a pre-shared key).
type hostFiles struct {
	name, dir string
	sock      string // control socket
	dnsKey    string // TSIG key file (btmm-dnsd addhost)
	keying    string
}

// writeHostConf writes dir/<name>.toml, the btmmd.toml of one test host
// (the lab's rendezvous on inet for DNS, debug logs, names confined to the
// test's directory) and returns its path. hc.extra is appended as is (whole
// sections: [paths], [tunnels], ...).
func writeHostConf(t *testing.T, f hostFiles, hc hostConf) string {
	t.Helper()
	nat := `mode = "auto"`
	if hc.nat != "" {
		nat = fmt.Sprintf("mode = \"off\"\nexternal = %q", hc.nat)
	}
	keepalive := ""
	if hc.keepalive != "" {
		keepalive = fmt.Sprintf("keepalive = %q", hc.keepalive)
	}
	network := ""
	if hc.debounce != "" {
		network = fmt.Sprintf("\n[network]\ndebounce = %q\n", hc.debounce)
	}
	services := lab.InetAddr
	if hc.services6 {
		services = "[" + inetAddr6 + "]"
	}
	conf := filepath.Join(f.dir, f.name+".toml")
	writeFile(t, conf, fmt.Sprintf(`host = %q
domain = %q
state_file = %q
control_socket = %q
log_level = "debug"

[tunnel]
dataplane = %q
%s

[dns]
key_file = %q
server = "%s:53"
resolver = "%s:53"

[nat]
%s

[keying]
%s
%s%s`, f.name, domain, filepath.Join(f.dir, f.name+".identity.json"), f.sock, hc.dataplane, keepalive, f.dnsKey,
		services, services, nat, f.keying, namesSection(f.dir, f.name), network)+hc.extra, 0o644)
	return conf
}

// kerberosKeying is the [keying] body for a host keyed with Kerberos.
func kerberosKeying(keytab, krb5Conf string) string {
	return fmt.Sprintf("keytab = %q\nkrb5_conf = %q\nrealm = %q", keytab, krb5Conf, realm)
}
