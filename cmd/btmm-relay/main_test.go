package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigErrorsAllAtOnce(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "relay.toml")
	os.WriteFile(p, []byte(`listen = ["nope", "[::1]:3478"]
public = "x"
ports = "5-1"
max_lifetime = "1s"
tls_listen = ["0.0.0.0:443", "bad"]
`), 0o600)
	var out, errb bytes.Buffer
	if code := run([]string{"-config", p}, &out, &errb); code != 2 {
		t.Fatalf("exit %d, want 2", code)
	}
	for _, want := range []string{`"nope" is not IPv4:port`, `"[::1]:3478" is not IPv4:port`, `public: "x"`, `ports: "5-1"`, "keys_dir and zone are required", `max_lifetime: "1s"`,
		`tls_listen: "bad"`, "tls_listen needs tls_cert and tls_key"} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, errb.String())
		}
	}
	os.WriteFile(p, []byte("listen = [\"127.0.0.1:0\"]\nkeys_dir = \"/x\"\nzone = \"z.\"\ntls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"\n"), 0o600)
	errb.Reset()
	if code := run([]string{"-config", p}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "tls_cert/tls_key") {
		t.Errorf("missing certificate: exit %d, %s", code, errb.String())
	}
	os.WriteFile(p, []byte("listen = [\"127.0.0.1:0\"]\nkeys_dir = \"/x\"\nzone = \"z.\"\nbogus = 1\n"), 0o600)
	errb.Reset()
	if code := run([]string{"-config", p}, &out, &errb); code != 2 || !strings.Contains(errb.String(), `unknown key "bogus"`) {
		t.Errorf("unknown key: exit %d, %s", code, errb.String())
	}
}
