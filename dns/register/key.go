package register

import (
	"encoding/base64"
	"errors"
	"fmt"
	"github.com/btmm/btmm/dns/tsig"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/miekg/dns"
)

// Key is a TSIG key (RFC 8945). Its secret never appears in String, in
// errors or in logs; only Secrets hands it to the DNS library.
type Key struct {
	Name      string // fully qualified key name, e.g. "alice.btmm.example."
	Algorithm string // miekg/dns algorithm name, e.g. dns.HmacSHA256

	mu     sync.RWMutex // guards secret, which Rotate replaces
	secret string       // base64, as in the key file
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
func (k *Key) Secrets() map[string]string { return map[string]string{k.Name: k.Secret()} }

// Secret returns the base64 secret, for dns.TsigGenerate / dns.TsigVerify.
func (k *Key) Secret() string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.secret
}

// ErrKeyIdentity is returned by Rotate for a key with another name or
// algorithm: those are part of the configuration, not of the secret.
var ErrKeyIdentity = errors.New("key name or algorithm differs")

// Rotate makes k sign with next's secret from now on (a key file re-read on
// SIGHUP). next must have k's name and algorithm; k is unchanged otherwise.
func (k *Key) Rotate(next *Key) error {
	if next.Name != k.Name || next.Algorithm != k.Algorithm {
		return fmt.Errorf("rotate %s to %s: %w", k, next, ErrKeyIdentity)
	}
	s := next.Secret()
	k.mu.Lock()
	k.secret = s
	k.mu.Unlock()
	return nil
}

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
	return fmt.Sprintf("key %q {\n\talgorithm %s;\n\tsecret %q;\n};\n", strings.TrimSuffix(k.Name, "."), k.BINDAlgorithm(), k.Secret())
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

// ParseKeys parses BIND key statements with the server's parser
// (tsig.ParseBIND): comments (#, //, /* */) are allowed, other statements are
// an error, and errors never quote the secret.
func ParseKeys(data []byte) ([]*Key, error) {
	tks, err := tsig.ParseBIND(data)
	if err != nil {
		return nil, fmt.Errorf("parse tsig key: %w", err)
	}
	keys := make([]*Key, 0, len(tks))
	for _, tk := range tks {
		k, err := NewKey(tk.Name, tk.Algorithm, tk.Base64())
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// Provider returns a miekg/dns TsigProvider for k. Unlike the library's
// built-in one it also does hmac-md5, which `btmm-dnsd adduser` can issue;
// the HMACs are package tsig's, the server's own.
func (k *Key) Provider() dns.TsigProvider {
	raw, _ := base64.StdEncoding.DecodeString(k.Secret()) // checked by NewKey
	return tsig.Key{Name: k.Name, Algorithm: k.Algorithm, Secret: raw}.Provider()
}
