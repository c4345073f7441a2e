package register

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

const tsigKeygenOut = `key "alice.btmm.example" {
	algorithm hmac-sha256;
	secret "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";
};
`

func TestParseKeysBINDFormat(t *testing.T) {
	keys, err := ParseKeys([]byte("# comment\n// another\n/* block\n */" + tsigKeygenOut +
		`key other. { algorithm "hmac-md5"; secret "YWJj"; };`))
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 {
		t.Fatalf("got %d keys", len(keys))
	}
	if k := keys[0]; k.Name != "alice.btmm.example." || k.Algorithm != dns.HmacSHA256 || k.Secret() != "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==" {
		t.Errorf("key 0 = %v", k)
	}
	if k := keys[1]; k.Name != "other." || k.Algorithm != dns.HmacMD5 {
		t.Errorf("key 1 = %v", k)
	}
	if s := keys[0].String(); strings.Contains(s, keys[0].Secret()) || !strings.Contains(s, "redacted") {
		t.Errorf("String leaks or does not say redacted: %q", s)
	}
}

func TestParseKeysErrors(t *testing.T) {
	for name, in := range map[string]string{
		"empty":           "",
		"no semicolon":    `key "a" { algorithm hmac-sha256; secret "YWJj"; }`,
		"unknown alg":     `key "a" { algorithm hmac-foo; secret "YWJj"; };`,
		"bad base64":      `key "a" { algorithm hmac-sha256; secret "SECRET!!"; };`,
		"missing secret":  `key "a" { algorithm hmac-sha256; };`,
		"unknown clause":  `key "a" { algorithm hmac-sha256; secret "YWJj"; color red; };`,
		"other statement": `options { directory "/tmp"; };`,
		"unterminated":    `key "a { algorithm`,
		"comment":         `/* key`,
		"twice":           `key "a" { secret "YWJj"; secret "YWJj"; algorithm hmac-sha256; };`,
		"no name":         `key { algorithm hmac-sha256; secret "YWJj"; };`,
	} {
		_, err := ParseKeys([]byte(in))
		if err == nil {
			t.Errorf("%s: no error", name)
			continue
		}
		if strings.Contains(err.Error(), "SECRET!!") || strings.Contains(err.Error(), "YWJj") {
			t.Errorf("%s: error leaks the secret: %v", name, err)
		}
	}
}

func TestLoadKeyFileRefusesReadableFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "k")
	if err := os.WriteFile(p, []byte(tsigKeygenOut), 0o600); err != nil {
		t.Fatal(err)
	}
	k, err := LoadKeyFile(p, "")
	if err != nil || k.Name != "alice.btmm.example." {
		t.Fatalf("0600: %v, %v", k, err)
	}
	if _, err := LoadKeyFile(p, "alice.btmm.example"); err != nil {
		t.Errorf("by name: %v", err)
	}
	if _, err := LoadKeyFile(p, "bob."); err == nil {
		t.Error("unknown name accepted")
	}
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o660} {
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		_, err := LoadKeyFile(p, "")
		if err == nil || !strings.Contains(err.Error(), "chmod 600") {
			t.Errorf("mode %04o: err = %v, want ErrKeyFileMode", mode, err)
		}
	}
	if _, err := LoadKeyFile(filepath.Join(dir, "missing"), ""); err == nil {
		t.Error("missing file accepted")
	}
}

// FuzzParseKeys: parse -> MarshalBIND -> parse gives the same keys.
func FuzzParseKeys(f *testing.F) {
	f.Add(tsigKeygenOut)
	f.Add(`key a. { algorithm hmac-sha512; secret "YWJj"; }; # x`)
	f.Add(`key "a" { secret "YWJj"; algorithm HMAC-SHA1; };`)
	f.Fuzz(func(t *testing.T, in string) {
		keys, err := ParseKeys([]byte(in))
		if err != nil {
			return
		}
		var out strings.Builder
		for _, k := range keys {
			out.WriteString(k.MarshalBIND())
		}
		again, err := ParseKeys([]byte(out.String()))
		if err != nil {
			t.Fatalf("re-parse of %q: %v", out.String(), err)
		}
		if len(again) != len(keys) {
			t.Fatalf("re-parse: %d keys, want %d", len(again), len(keys))
		}
		for i := range keys {
			if *again[i] != *keys[i] {
				t.Fatalf("key %d: %v != %v", i, again[i], keys[i])
			}
		}
	})
}

func TestKeyRotate(t *testing.T) {
	k, _ := NewKey("alice.btmm.example.", "hmac-sha256", "c2VjcmV0LW9uZQ==")
	next, _ := NewKey("alice.btmm.example.", "hmac-sha256", "c2VjcmV0LXR3bw==")
	if err := k.Rotate(next); err != nil || k.Secret() != "c2VjcmV0LXR3bw==" {
		t.Fatalf("Rotate: %v, secret now %q", err, k.Secret())
	}
	for _, bad := range []*Key{
		must(NewKey("bob.btmm.example.", "hmac-sha256", "eA==")),
		must(NewKey("alice.btmm.example.", "hmac-sha512", "eA==")),
	} {
		if err := k.Rotate(bad); !errors.Is(err, ErrKeyIdentity) || k.Secret() != "c2VjcmV0LXR3bw==" {
			t.Errorf("Rotate(%s) = %v, secret %q: want ErrKeyIdentity and no change", bad, err, k.Secret())
		}
	}
}

func must(k *Key, err error) *Key {
	if err != nil {
		panic(err)
	}
	return k
}
