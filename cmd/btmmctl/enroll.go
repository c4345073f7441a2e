package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/btmm/btmm/cmd/internal/enroll"
)

const enrollUsage = `btmmctl enroll [flags] BUNDLE

Installs an enrollment bundle printed by the server's
"btmm-dnsd enroll USER HOST" (BUNDLE is a file, or - for standard input):
writes the host's TSIG key, keytab and krb5.conf (or pre-shared key) with
mode 0600 where secret, the server's CA, and a working btmmd.toml. Existing
files are left alone unless -force. Then: systemctl enable --now btmmd.

Flags:`

// enrollCommand runs `btmmctl enroll`.
func enrollCommand(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("btmmctl enroll", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "/etc/btmm", "where the key files go")
	conf := fs.String("config", "", "btmmd configuration to write (default DIR/btmmd.toml)")
	force := fs.Bool("force", false, "replace existing files")
	fs.Usage = func() { fmt.Fprintln(fs.Output(), enrollUsage); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	var data []byte
	var err error
	if fs.Arg(0) == "-" {
		data, err = io.ReadAll(io.LimitReader(stdin, 1<<20))
	} else {
		data, err = os.ReadFile(fs.Arg(0))
	}
	if err != nil {
		fmt.Fprintln(stderr, "btmmctl enroll:", err)
		return 1
	}
	b, err := enroll.Parse(data)
	if err != nil {
		fmt.Fprintln(stderr, "btmmctl enroll:", err)
		return 1
	}
	if *conf == "" {
		*conf = filepath.Join(*dir, "btmmd.toml")
	}
	files, err := install(b, *dir, *conf, *force)
	if err != nil {
		fmt.Fprintln(stderr, "btmmctl enroll:", err)
		return 1
	}
	fmt.Fprintf(stdout, "enrolled %s.%s with %s\n", b.Host, strings.TrimSuffix(b.Domain, "."), b.Server)
	for _, f := range files {
		fmt.Fprintf(stdout, "  wrote %s\n", f)
	}
	fmt.Fprintln(stdout, "next: systemctl enable --now btmmd   (then: btmmctl status)")
	return 0
}

type file struct {
	path    string
	mode    os.FileMode
	content []byte
}

// install writes the bundle's files and the configuration, checking first
// that none exists (unless force), so a refused enrollment changes nothing.
func install(b *enroll.Bundle, dir, conf string, force bool) ([]string, error) {
	keyFile := filepath.Join(dir, "btmm.key")
	var fs []file
	fs = append(fs, file{keyFile, 0o600, []byte(b.TSIGKey)})
	var dnsExtra, keying string
	if b.CAPEM != "" {
		ca := filepath.Join(dir, "ca.pem")
		fs = append(fs, file{ca, 0o644, []byte(b.CAPEM)})
		host, _, _ := strings.Cut(b.Server, ":")
		dnsExtra = fmt.Sprintf("# DNS over TLS (the certificate must name the server): tls = true, server = \"%s:%d\"\nca_file = %q\n", host, b.TLSPort, ca)
	}
	if len(b.Keytab) > 0 {
		kt, kc := filepath.Join(dir, "krb5.keytab"), filepath.Join(dir, "krb5.conf")
		fs = append(fs, file{kt, 0o600, b.Keytab},
			file{kc, 0o644, []byte(fmt.Sprintf("[libdefaults]\n default_realm = %s\n dns_lookup_kdc = false\n rdns = false\n\n[realms]\n %s = {\n  kdc = %s\n }\n", b.Realm, b.Realm, b.KDC))})
		keying = fmt.Sprintf("mode      = \"kerberos\"\nkeytab    = %q\nkrb5_conf = %q\nrealm     = %q\nprincipal = %q\n", kt, kc, b.Realm, strings.TrimSuffix(b.Principal, "@"+b.Realm))
	} else {
		psk := filepath.Join(dir, "psk")
		fs = append(fs, file{psk, 0o600, b.PSK})
		keying = fmt.Sprintf("mode     = \"psk\"\npsk_file = %q\n", psk)
	}
	fs = append(fs, file{conf, 0o644, []byte(fmt.Sprintf(`# Written by btmmctl enroll from the server's bundle (docs/deploy.md).
host   = %q
domain = %q

[dns]
key_file = %q
zone     = %q
server   = %q
%s
[keying]
%s`, b.Host, b.Domain, keyFile, b.Zone, b.Server, dnsExtra, keying))})
	if !force {
		var exist []string
		for _, f := range fs {
			if _, err := os.Lstat(f.path); err == nil {
				exist = append(exist, f.path)
			}
		}
		if len(exist) > 0 {
			return nil, fmt.Errorf("%s already exist: nothing written (use -force to replace them)", strings.Join(exist, ", "))
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var done []string
	for _, f := range fs {
		if err := writeFile(f); err != nil {
			return done, err
		}
		done = append(done, fmt.Sprintf("%s (%04o)", f.path, f.mode))
	}
	return done, nil
}

// writeFile writes f atomically with its mode set from the start (a secret
// is never readable by others, not even for a moment).
func writeFile(f file) error {
	if err := os.MkdirAll(filepath.Dir(f.path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(f.path), "."+filepath.Base(f.path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(f.mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(f.content); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), f.path); err != nil {
		return errors.Join(fmt.Errorf("write %s", f.path), err)
	}
	return nil
}
