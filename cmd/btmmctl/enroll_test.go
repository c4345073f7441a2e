package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/btmm/btmm/cmd/internal/enroll"
	"github.com/btmm/btmm/xfrm"
)

func TestHelpNamesRouteProtocol(t *testing.T) {
	var out bytes.Buffer
	run([]string{"--help"}, &out, &out)
	if !strings.Contains(out.String(), "proto "+strconv.Itoa(int(xfrm.DefaultRouteProtocol))) {
		t.Fatalf("help does not name the route protocol %d:\n%s", xfrm.DefaultRouteProtocol, out.String())
	}
}

func TestEnrollInstall(t *testing.T) {
	dir := t.TempDir()
	b := &enroll.Bundle{Host: "laptop", Domain: "alice.btmm.example.", Zone: "btmm.example.", Server: "203.0.113.10:53",
		TSIGKey: "key \"laptop.alice.btmm.example\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n",
		Realm:   "BTMM.EXAMPLE", KDC: "203.0.113.10", Principal: "host/laptop.alice.btmm.example@BTMM.EXAMPLE", Keytab: []byte{5, 2, 9}}
	text, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(dir, "laptop.bundle")
	os.WriteFile(bundle, text, 0o600)
	etc := filepath.Join(dir, "etc")
	var stdout, stderr bytes.Buffer
	if code := run([]string{"enroll", "-dir", etc, bundle}, &stdout, &stderr); code != 0 {
		t.Fatalf("enroll: exit %d: %s", code, stderr.String())
	}
	for name, mode := range map[string]os.FileMode{"btmm.key": 0o600, "krb5.keytab": 0o600, "krb5.conf": 0o644, "btmmd.toml": 0o644} {
		st, err := os.Stat(filepath.Join(etc, name))
		if err != nil || st.Mode().Perm() != mode {
			t.Errorf("%s: %v, mode %v, want %04o", name, err, st.Mode(), mode)
		}
	}
	conf, _ := os.ReadFile(filepath.Join(etc, "btmmd.toml"))
	for _, want := range []string{`host   = "laptop"`, `domain = "alice.btmm.example."`, `server   = "203.0.113.10:53"`,
		`mode      = "kerberos"`, `principal = "host/laptop.alice.btmm.example"`, `realm     = "BTMM.EXAMPLE"`, filepath.Join(etc, "krb5.keytab")} {
		if !strings.Contains(string(conf), want) {
			t.Errorf("btmmd.toml lacks %s:\n%s", want, conf)
		}
	}
	if kt, _ := os.ReadFile(filepath.Join(etc, "krb5.keytab")); !bytes.Equal(kt, b.Keytab) {
		t.Errorf("keytab = %x", kt)
	}
	if strings.Contains(stdout.String(), "c2VjcmV0") {
		t.Errorf("enroll printed the secret:\n%s", stdout.String())
	}

	// Again: refused, nothing changed.
	os.WriteFile(filepath.Join(etc, "btmm.key"), []byte("mine"), 0o600)
	stderr.Reset()
	if code := run([]string{"enroll", "-dir", etc, bundle}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "already exist: nothing written") {
		t.Fatalf("second enroll: exit %d: %s", code, stderr.String())
	}
	if k, _ := os.ReadFile(filepath.Join(etc, "btmm.key")); string(k) != "mine" {
		t.Fatal("a refused enroll changed btmm.key")
	}
	// A damaged bundle: refused, nothing written.
	os.WriteFile(bundle, text[:len(text)/2], 0o600)
	other := filepath.Join(dir, "other")
	stderr.Reset()
	if code := run([]string{"enroll", "-dir", other, bundle}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "not a btmm enrollment bundle") {
		t.Fatalf("damaged bundle: exit %d: %s", code, stderr.String())
	}
	if _, err := os.Stat(other); !os.IsNotExist(err) {
		t.Fatal("a refused enroll created the directory")
	}
}

// TestNetcheck: without btmmd it says so, probes the kernel and the KDCs of
// the given krb5.conf (here one that does not answer), and --json uses the
// documented snake_case keys.
func TestNetcheck(t *testing.T) {
	dir := t.TempDir()
	kc := filepath.Join(dir, "krb5.conf")
	os.WriteFile(kc, []byte("[libdefaults]\n default_realm = R.EXAMPLE\n[realms]\n R.EXAMPLE = {\n  kdc = 127.0.0.1:1\n }\n"), 0o644)
	var out, errb bytes.Buffer
	if code := run([]string{"-socket", filepath.Join(dir, "none.sock"), "-krb5-conf", kc, "--json", "netcheck"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var n map[string]any
	if err := json.Unmarshal(out.Bytes(), &n); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"kernel", "btmmd", "kdc"} {
		if _, ok := n[k]; !ok {
			t.Errorf("--json lacks %q: %s", k, out.String())
		}
	}
	if !strings.Contains(out.String(), `"name": "R.EXAMPLE 127.0.0.1:1"`) || !strings.Contains(out.String(), "btmmd not reachable") {
		t.Errorf("netcheck: %s", out.String())
	}
	out.Reset()
	run([]string{"-socket", filepath.Join(dir, "none.sock"), "-krb5-conf", kc, "netcheck"}, &out, &errb)
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if len(l) > 160 {
			t.Errorf("table line longer than 160: %q", l)
		}
	}
	if !strings.Contains(out.String(), "kdc R.EXAMPLE 127.0.0.1:1") || !strings.Contains(out.String(), "NO") {
		t.Errorf("table: %s", out.String())
	}
}

func TestCompletion(t *testing.T) {
	var out bytes.Buffer
	if code := run([]string{"completion"}, &out, &out); code != 0 || !strings.Contains(out.String(), "complete -F _btmmctl btmmctl") {
		t.Fatalf("completion: %d %s", code, out.String())
	}
}
