package tsig

import (
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestMD5Vector(t *testing.T) {
	// RFC 2202 test case 2.
	k := Key{Name: "k.", Algorithm: HmacMD5, Secret: []byte("Jefe")}
	mac, _ := k.MAC([]byte("what do ya want for nothing?"))
	if got := hex.EncodeToString(mac); got != "750c783e6ab0b503eaa86e310a5db738" {
		t.Fatalf("hmac-md5 = %s", got)
	}
}

func TestSignVerifyAllAlgorithms(t *testing.T) {
	for _, alg := range []string{"hmac-md5", "hmac-sha1", "hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512"} {
		k, err := NewKey("alice.btmm.example", alg)
		if err != nil {
			t.Fatal(err)
		}
		m := new(dns.Msg)
		m.SetQuestion("x.btmm.example.", dns.TypeA)
		m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
		data, _, err := dns.TsigGenerateWithProvider(m, k.Provider(), "", false)
		if err != nil {
			t.Fatalf("%s: %v", alg, err)
		}
		// Verification rewrites the buffer in place: give each call a copy.
		cp := func() []byte { return append([]byte(nil), data...) }
		if err := dns.TsigVerifyWithProvider(cp(), k.Provider(), "", false); err != nil {
			t.Fatalf("%s: verify: %v", alg, err)
		}
		// Another key of the same name fails; an unknown key is ErrSecret.
		other, _ := NewKey("alice.btmm.example", alg)
		if err := dns.TsigVerifyWithProvider(cp(), other.Provider(), "", false); err != dns.ErrSig {
			t.Fatalf("%s: wrong key: %v", alg, err)
		}
		if err := dns.TsigVerifyWithProvider(cp(), NewKeyring(), "", false); err != dns.ErrSecret {
			t.Fatalf("%s: unknown key: %v", alg, err)
		}
	}
}

func TestAlgorithmMismatchIsBadKey(t *testing.T) {
	k, _ := NewKey("a.", "hmac-sha256")
	r := NewKeyring()
	r.Add(k)
	if err := r.Verify(nil, &dns.TSIG{Hdr: dns.RR_Header{Name: "a."}, Algorithm: HmacMD5}); err != dns.ErrKeyAlg {
		t.Fatal(err)
	}
}

func TestKeyFileRoundTripAndSecrecy(t *testing.T) {
	k, _ := NewKey("alice.btmm.example.", "hmac-md5")
	p := filepath.Join(t.TempDir(), "alice.key")
	if err := WriteFile(p, k); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}
	got, err := ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != k.Name || got.Algorithm != k.Algorithm || string(got.Secret) != string(k.Secret) {
		t.Fatalf("round trip %v", got)
	}
	for _, s := range []string{k.String(), fmt.Sprintf("%v", k), fmt.Sprintf("%+v", k), fmt.Sprintf("%#v", k)} {
		if strings.Contains(s, k.Base64()) {
			t.Fatalf("secret leaked: %s", s)
		}
	}
}

func TestParseBIND(t *testing.T) {
	// tsig-keygen output with comments.
	in := `# generated
key "alice.btmm.example" {
	algorithm hmac-sha256; // the default
	secret "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";
};
/* second */ key bob { algorithm hmac-md5.sig-alg.reg.int; secret "Ym9i"; };
`
	keys, err := ParseBIND(stripHashComments([]byte(in)))
	if err != nil || len(keys) != 2 {
		t.Fatalf("%v %v", keys, err)
	}
	if keys[0].Name != "alice.btmm.example." || keys[0].Algorithm != HmacSHA256 || keys[1].Algorithm != HmacMD5 {
		t.Fatalf("%v", keys)
	}
	for _, bad := range []string{`key "a" { algorithm hmac-foo; secret "Ym9i"; };`, `key "a" { algorithm hmac-md5; secret "!!"; };`,
		`key "a" { algorithm hmac-md5; secret "Ym9i" };`, `nope`, `key "a" {`} {
		if _, err := ParseBIND([]byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

// The BIND clause is accepted by BIND's own parser (tsig-keygen's format).
func TestBINDClauseMatchesTsigKeygen(t *testing.T) {
	k, _ := NewKey("alice.btmm.example.", "")
	want := fmt.Sprintf("key \"alice.btmm.example\" {\n\talgorithm hmac-sha256;\n\tsecret \"%s\";\n};\n", k.Base64())
	if k.BINDClause() != want {
		t.Fatalf("got %q", k.BINDClause())
	}
}

// Generation changes with every Add (also a replacement) and Remove, and
// not with look-ups (what caches of derived state rely on).
func TestKeyringGeneration(t *testing.T) {
	r := NewKeyring()
	k, err := NewKey("h.u.btmm.example.", "")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{r.Generation(): true}
	step := func(what string) {
		t.Helper()
		g := r.Generation()
		if seen[g] {
			t.Fatalf("%s: generation %d seen before", what, g)
		}
		seen[g] = true
	}
	r.Add(k)
	step("add")
	r.Get(k.Name)
	r.Has(k.Name)
	r.Get("other.btmm.example.")
	if !seen[r.Generation()] || len(seen) != 2 {
		t.Fatal("a look-up changed the generation")
	}
	k2, _ := NewKey(k.Name, "")
	r.Add(k2)
	step("replace")
	r.Remove(k.Name)
	step("remove")
}
