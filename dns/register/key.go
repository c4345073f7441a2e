package register

import (
	"encoding/base64"
	"errors"
	"fmt"
	"github.com/btmm/btmm/dns/tsig"
	"io"
	"os"
	"strings"

	"github.com/miekg/dns"
)

// Key is a TSIG key (RFC 8945). Its secret never appears in String, in
// errors or in logs; only Secrets hands it to the DNS library.
type Key struct {
	Name      string // fully qualified key name, e.g. "alice.btmm.example."
	Algorithm string // miekg/dns algorithm name, e.g. dns.HmacSHA256
	secret    string // base64, as in the key file
}

// NewKey builds a key from its parts; secret is base64.
func NewKey(name, algorithm, secret string) (*Key, error) {
	alg, err := tsig.ParseAlgorithm(algorithm)
	if err != nil {
		return nil, fmt.Errorf("tsig key %q: unsupported algorithm %q", name, algorithm)
	}
	raw, err := base64.StdEncoding.DecodeString(secret)
	if err != nil || len(raw) == 0 {
		return nil, fmt.Errorf("tsig key %q: secret is not non-empty base64", name)
	}
	if _, ok := dns.IsDomainName(name); !ok || name == "" || name == "." {
		return nil, fmt.Errorf("tsig key %q: not a domain name", name)
	}
	return &Key{Name: dns.CanonicalName(name), Algorithm: alg, secret: base64.StdEncoding.EncodeToString(raw)}, nil
}

// String names the key without its secret.
func (k *Key) String() string {
	if k == nil {
		return "tsig key <none>"
	}
	return fmt.Sprintf("tsig key %s (%s, secret redacted)", k.Name, k.Algorithm)
}

// Secrets is the map miekg/dns's Client.TsigSecret and Conn.TsigSecret want.
func (k *Key) Secrets() map[string]string { return map[string]string{k.Name: k.secret} }

// Secret returns the base64 secret, for dns.TsigGenerate / dns.TsigVerify.
func (k *Key) Secret() string { return k.secret }

// BINDAlgorithm is the algorithm's name in BIND's key syntax.
func (k *Key) BINDAlgorithm() string {
	name := strings.TrimSuffix(k.Algorithm, ".")
	if k.Algorithm == dns.HmacMD5 {
		name = "hmac-md5"
	}
	return name
}

// MarshalBIND renders the key in BIND's syntax (it contains the secret:
// write it only to a 0600 file).
func (k *Key) MarshalBIND() string {
	return fmt.Sprintf("key %q {\n\talgorithm %s;\n\tsecret %q;\n};\n", strings.TrimSuffix(k.Name, "."), k.BINDAlgorithm(), k.secret)
}

// ErrKeyFileMode is returned for a key file group or others may read.
var ErrKeyFileMode = errors.New("key file is readable by group or others")

// LoadKeyFile reads a TSIG key from a file in BIND's syntax, as printed by
// tsig-keygen and `btmm-dnsd adduser`:
//
//	key "alice.btmm.example" { algorithm hmac-sha256; secret "base64..."; };
//
// The file must not be accessible to group or others (mode 0600 or stricter),
// else LoadKeyFile refuses it with ErrKeyFileMode. name selects one key of
// several; "" requires the file to hold exactly one.
func LoadKeyFile(path, name string) (*Key, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load tsig key: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("load tsig key: %w", err)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("load tsig key %s: mode %04o: %w (run: chmod 600 %s)", path, perm, ErrKeyFileMode, path)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("load tsig key %s: not a regular file", path)
	}
	data, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("load tsig key %s: %w", path, err)
	}
	keys, err := ParseKeys(data)
	if err != nil {
		return nil, fmt.Errorf("load tsig key %s: %w", path, err)
	}
	if name == "" {
		if len(keys) != 1 {
			return nil, fmt.Errorf("load tsig key %s: file holds %d keys, name one", path, len(keys))
		}
		return keys[0], nil
	}
	for _, k := range keys {
		if k.Name == dns.CanonicalName(name) {
			return k, nil
		}
	}
	return nil, fmt.Errorf("load tsig key %s: no key named %q", path, name)
}

// ParseKeys parses BIND key statements. Comments (#, //, /* */) are allowed;
// other statements are an error. Errors never quote the secret.
func ParseKeys(data []byte) ([]*Key, error) {
	toks, err := tokenize(string(data))
	if err != nil {
		return nil, err
	}
	var keys []*Key
	p := &parser{toks: toks}
	for !p.done() {
		k, err := p.key()
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, errors.New("parse tsig key: no key statement")
	}
	return keys, nil
}

type token struct {
	s      string
	quoted bool
}

func tokenize(s string) ([]token, error) {
	var toks []token
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#' || strings.HasPrefix(s[i:], "//"):
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case strings.HasPrefix(s[i:], "/*"):
			end := strings.Index(s[i+2:], "*/")
			if end < 0 {
				return nil, errors.New("parse tsig key: unterminated /* comment")
			}
			i += end + 4
		case c == '{' || c == '}' || c == ';':
			toks = append(toks, token{s: string(c)})
			i++
		case c == '"':
			end := strings.IndexByte(s[i+1:], '"')
			if end < 0 {
				return nil, errors.New("parse tsig key: unterminated string")
			}
			toks = append(toks, token{s: s[i+1 : i+1+end], quoted: true})
			i += end + 2
		default:
			j := i
			for j < len(s) && !strings.ContainsRune(" \t\r\n{};\"#", rune(s[j])) && !strings.HasPrefix(s[j:], "//") && !strings.HasPrefix(s[j:], "/*") {
				j++
			}
			toks = append(toks, token{s: s[i:j]})
			i = j
		}
	}
	return toks, nil
}

type parser struct {
	toks []token
	i    int
}

func (p *parser) done() bool { return p.i >= len(p.toks) }

func (p *parser) next() (token, error) {
	if p.done() {
		return token{}, errors.New("parse tsig key: unexpected end of file")
	}
	t := p.toks[p.i]
	p.i++
	return t, nil
}

func (p *parser) expect(s string) error {
	t, err := p.next()
	if err != nil {
		return err
	}
	if t.quoted || t.s != s {
		return fmt.Errorf("parse tsig key: want %q, got %q", s, redactTok(t))
	}
	return nil
}

// redactTok keeps quoted strings (possibly secrets) out of error messages.
func redactTok(t token) string {
	if t.quoted {
		return `"..."`
	}
	if len(t.s) > 32 {
		return t.s[:32] + "..."
	}
	return t.s
}

func (p *parser) key() (*Key, error) {
	if err := p.expect("key"); err != nil {
		return nil, err
	}
	nameTok, err := p.next()
	if err != nil {
		return nil, err
	}
	if nameTok.s == "{" && !nameTok.quoted {
		return nil, errors.New("parse tsig key: key statement without a name")
	}
	name := nameTok.s
	if err := p.expect("{"); err != nil {
		return nil, err
	}
	var alg, secret string
	var haveAlg, haveSecret bool
	for {
		t, err := p.next()
		if err != nil {
			return nil, err
		}
		if t.s == "}" && !t.quoted {
			break
		}
		val, err := p.next()
		if err != nil {
			return nil, err
		}
		if !val.quoted && (val.s == ";" || val.s == "{" || val.s == "}") {
			return nil, fmt.Errorf("parse tsig key %q: %q has no value", name, redactTok(t))
		}
		switch t.s {
		case "algorithm":
			if haveAlg {
				return nil, fmt.Errorf("parse tsig key %q: algorithm given twice", name)
			}
			alg, haveAlg = val.s, true
		case "secret":
			if haveSecret {
				return nil, fmt.Errorf("parse tsig key %q: secret given twice", name)
			}
			secret, haveSecret = val.s, true
		default:
			return nil, fmt.Errorf("parse tsig key %q: unknown clause %q", name, redactTok(t))
		}
		if err := p.expect(";"); err != nil {
			return nil, err
		}
	}
	if err := p.expect(";"); err != nil {
		return nil, err
	}
	if !haveAlg || !haveSecret {
		return nil, fmt.Errorf("parse tsig key %q: needs both algorithm and secret", name)
	}
	return NewKey(name, alg, secret)
}

// Provider returns a miekg/dns TsigProvider for k. Unlike the library's
// built-in one it also does hmac-md5, which `btmm-dnsd adduser` can issue;
// the HMACs are package tsig's, the server's own.
func (k *Key) Provider() dns.TsigProvider {
	raw, _ := base64.StdEncoding.DecodeString(k.secret) // checked by NewKey
	return tsig.Key{Name: k.Name, Algorithm: k.Algorithm, Secret: raw}.Provider()
}
