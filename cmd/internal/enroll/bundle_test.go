package enroll

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const key = "key \"laptop.alice.btmm.example\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n"

func sample() *Bundle {
	return &Bundle{Host: "laptop", Domain: "alice.btmm.example.", Zone: "btmm.example.", Server: "203.0.113.10:53",
		TLSPort: 853, CAPEM: "-----BEGIN CERTIFICATE-----\nMII...\n-----END CERTIFICATE-----\n", TSIGKey: key,
		Realm: "BTMM.EXAMPLE", KDC: "203.0.113.10", Principal: "host/laptop.alice.btmm.example@BTMM.EXAMPLE", Keytab: []byte{5, 2, 0, 0}}
}

// golden is sample() in the wire format; a change here breaks bundles that
// servers already printed.
const golden = `# btmm enrollment for laptop.alice.btmm.example — contains secrets: move it once, then delete it
btmm-enroll-v1
eyJob3N0IjoibGFwdG9wIiwiZG9tYWluIjoiYWxpY2UuYnRtbS5leGFtcGxlLiIsInpvbmUiOiJi
dG1tLmV4YW1wbGUuIiwic2VydmVyIjoiMjAzLjAuMTEzLjEwOjUzIiwidGxzX3BvcnQiOjg1Mywi
Y2FfcGVtIjoiLS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tXG5NSUkuLi5cbi0tLS0tRU5EIENF
UlRJRklDQVRFLS0tLS1cbiIsInRzaWdfa2V5Ijoia2V5IFwibGFwdG9wLmFsaWNlLmJ0bW0uZXhh
bXBsZVwiIHtcblx0YWxnb3JpdGhtIGhtYWMtc2hhMjU2O1xuXHRzZWNyZXQgXCJjMlZqY21WMFwi
O1xufTtcbiIsInJlYWxtIjoiQlRNTS5FWEFNUExFIiwia2RjIjoiMjAzLjAuMTEzLjEwIiwicHJp
bmNpcGFsIjoiaG9zdC9sYXB0b3AuYWxpY2UuYnRtbS5leGFtcGxlQEJUTU0uRVhBTVBMRSIsImtl
eXRhYiI6IkJRSUFBQT09In0=
`

func TestGolden(t *testing.T) {
	got, err := sample().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(golden, string(got)); diff != "" {
		t.Fatalf("Marshal (-want +got):\n%s", diff)
	}
	b, err := Parse([]byte("\n  " + strings.ReplaceAll(golden, "\n", "\r\n") + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(sample(), b); diff != "" {
		t.Fatalf("Parse (-want +got):\n%s", diff)
	}
}

func TestBad(t *testing.T) {
	for _, tc := range []struct {
		name, text, want string
		is               error
	}{
		{"empty", "", "not a btmm enrollment bundle", ErrFormat},
		{"newer", "btmm-enroll-v2\nabc\n", `found version "btmm-enroll-v2"`, ErrFormat},
		{"not base64", "btmm-enroll-v1\n!!!\n", "illegal base64", ErrFormat},
		{"unknown field", "btmm-enroll-v1\n" + b64(`{"host":"a","bogus":1}`), "unknown field", ErrFormat},
		{"incomplete", "btmm-enroll-v1\n" + b64(`{"host":"a.b","domain":"alice.btmm.example."}`),
			"host \"a.b\" is not one DNS label", nil},
	} {
		_, err := Parse([]byte(tc.text))
		if err == nil || !strings.Contains(err.Error(), tc.want) || (tc.is != nil && !errors.Is(err, tc.is)) {
			t.Errorf("%s: Parse = %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	b := sample()
	b.PSK = []byte("x")
	if _, err := b.Marshal(); err == nil || !strings.Contains(err.Error(), "pick one keying mode") {
		t.Errorf("keytab and PSK: %v", err)
	}
	b = sample()
	b.Keytab, b.Realm, b.Principal = nil, "", ""
	if _, err := b.Marshal(); err == nil || !strings.Contains(err.Error(), "no keying material") {
		t.Errorf("no keying: %v", err)
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func FuzzParse(f *testing.F) {
	f.Add([]byte(golden))
	f.Add([]byte("btmm-enroll-v1\ne30=\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := Parse(data)
		if err != nil {
			return
		}
		out, err := b.Marshal()
		if err != nil {
			t.Fatalf("a parsed bundle does not marshal: %v", err)
		}
		b2, err := Parse(out)
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if diff := cmp.Diff(b, b2); diff != "" {
			t.Fatalf("parse -> marshal -> parse changed it:\n%s", diff)
		}
	})
}
