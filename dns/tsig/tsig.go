// Package tsig implements DNS transaction signatures (TSIG, RFC 8945) for
// btmm-dnsd: a [dns.TsigProvider] keyring holding one key per user with
// hmac-sha256 (the default), hmac-sha512, hmac-sha1, hmac-sha224, hmac-sha384
// and, for BTMM/mDNSResponder clients, hmac-md5 (RFC 8945 §6, dropped by
// miekg/dns), plus key files in BIND's `key` clause format (stored 0600).
//
// Secrets never appear in String output, errors or logs.
package tsig

import (
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/miekg/dns"
)

// Algorithm names (canonical, fully qualified).
const (
	HmacMD5    = "hmac-md5.sig-alg.reg.int."
	HmacSHA1   = dns.HmacSHA1
	HmacSHA224 = dns.HmacSHA224
	HmacSHA256 = dns.HmacSHA256
	HmacSHA384 = dns.HmacSHA384
	HmacSHA512 = dns.HmacSHA512
)

// Errors returned by this package.
var (
	ErrUnknownAlgorithm = errors.New("tsig: unknown algorithm")
	ErrBadKeyName       = errors.New("tsig: bad key name")
	ErrBadSecret        = errors.New("tsig: bad secret")
)

// ParseAlgorithm maps a BIND / nsupdate algorithm name ("hmac-sha256",
// "hmac-md5", "hmac-md5.sig-alg.reg.int.", ...) to its canonical name.
func ParseAlgorithm(s string) (string, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	switch strings.TrimSuffix(s, ".") {
	case "hmac-md5", "hmac-md5.sig-alg.reg.int":
		return HmacMD5, nil
	case "hmac-sha1":
		return HmacSHA1, nil
	case "hmac-sha224":
		return HmacSHA224, nil
	case "hmac-sha256":
		return HmacSHA256, nil
	case "hmac-sha384":
		return HmacSHA384, nil
	case "hmac-sha512":
		return HmacSHA512, nil
	}
	return "", fmt.Errorf("%w %q", ErrUnknownAlgorithm, s)
}

// ShortAlgorithm returns BIND's short name for a canonical algorithm
// ("hmac-sha256" for "hmac-sha256.").
func ShortAlgorithm(alg string) string {
	if dns.CanonicalName(alg) == HmacMD5 {
		return "hmac-md5"
	}
	return strings.TrimSuffix(dns.CanonicalName(alg), ".")
}

func newHash(alg string) (func() hash.Hash, int, error) {
	switch dns.CanonicalName(alg) {
	case HmacMD5:
		return md5.New, md5.Size, nil
	case HmacSHA1:
		return sha1.New, sha1.Size, nil
	case HmacSHA224:
		return sha256.New224, sha256.Size224, nil
	case HmacSHA256:
		return sha256.New, sha256.Size, nil
	case HmacSHA384:
		return sha512.New384, sha512.Size384, nil
	case HmacSHA512:
		return sha512.New, sha512.Size, nil
	}
	return nil, 0, fmt.Errorf("%w %q", ErrUnknownAlgorithm, alg)
}

// Key is one TSIG key. Name is the fully qualified key name, Algorithm the
// canonical algorithm name, Secret the raw secret bytes.
type Key struct {
	Name      string
	Algorithm string
	Secret    []byte
}

// String names the key and its algorithm, never the secret.
func (k Key) String() string {
	return fmt.Sprintf("tsig key %s (%s)", k.Name, ShortAlgorithm(k.Algorithm))
}

// GoString hides the secret from %#v as well.
func (k Key) GoString() string { return k.String() }

// Base64 returns the secret in base64, as nsupdate -y and miekg/dns expect.
func (k Key) Base64() string { return base64.StdEncoding.EncodeToString(k.Secret) }

// NewKey returns a fresh random key of the given algorithm (default
// hmac-sha256) whose secret is as long as the hash output.
func NewKey(name, algorithm string) (Key, error) {
	if algorithm == "" {
		algorithm = HmacSHA256
	}
	alg, err := ParseAlgorithm(algorithm)
	if err != nil {
		return Key{}, err
	}
	if _, ok := dns.IsDomainName(name); !ok || name == "" || name == "." {
		return Key{}, fmt.Errorf("%w %q", ErrBadKeyName, name)
	}
	_, size, _ := newHash(alg)
	secret := make([]byte, size)
	if _, err := rand.Read(secret); err != nil {
		return Key{}, fmt.Errorf("tsig: new key: %w", err)
	}
	return Key{Name: dns.CanonicalName(name), Algorithm: alg, Secret: secret}, nil
}

// MAC computes the HMAC of msg with the key.
func (k Key) MAC(msg []byte) ([]byte, error) {
	h, _, err := newHash(k.Algorithm)
	if err != nil {
		return nil, err
	}
	m := hmac.New(h, k.Secret)
	m.Write(msg)
	return m.Sum(nil), nil
}

// Provider returns a [dns.TsigProvider] for this single key, for clients.
func (k Key) Provider() dns.TsigProvider {
	r := NewKeyring()
	r.Add(k)
	return r
}

// Keyring is a concurrency-safe set of keys implementing [dns.TsigProvider].
// The zero value is not usable; call NewKeyring.
type Keyring struct {
	mu   sync.RWMutex
	keys map[string]Key
	gen  atomic.Uint64 // changes with every Add and Remove
	// Miss, when set, is called (without the lock held) for a key name not in
	// the ring; it may return the key (e.g. just added on disk by an admin).
	Miss func(name string) (Key, bool)
}

// NewKeyring returns an empty keyring.
func NewKeyring() *Keyring { return &Keyring{keys: map[string]Key{}} }

// Add adds or replaces a key.
func (r *Keyring) Add(k Key) {
	k.Name = dns.CanonicalName(k.Name)
	r.mu.Lock()
	r.keys[k.Name] = k
	r.gen.Add(1)
	r.mu.Unlock()
}

// Remove deletes the key with this name.
func (r *Keyring) Remove(name string) {
	r.mu.Lock()
	delete(r.keys, dns.CanonicalName(name))
	r.gen.Add(1)
	r.mu.Unlock()
}

// Generation changes whenever a key is added, replaced or removed: what
// was derived from the ring's keys at one generation (a Signer) is still
// current while it is the same.
func (r *Keyring) Generation() uint64 { return r.gen.Load() }

// Get returns the key with this name.
func (r *Keyring) Get(name string) (Key, bool) {
	name = dns.CanonicalName(name)
	r.mu.RLock()
	k, ok := r.keys[name]
	miss := r.Miss
	r.mu.RUnlock()
	if !ok && miss != nil {
		if k, ok = miss(name); ok {
			r.Add(k)
		}
	}
	return k, ok
}

// Has reports whether the ring holds a key of this name (without asking Miss).
func (r *Keyring) Has(name string) bool {
	r.mu.RLock()
	_, ok := r.keys[dns.CanonicalName(name)]
	r.mu.RUnlock()
	return ok
}

// Names returns the key names in the ring.
func (r *Keyring) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]string, 0, len(r.keys))
	for n := range r.keys {
		out = append(out, n)
	}
	return out
}

// Generate implements [dns.TsigProvider]. The key is chosen by the TSIG
// owner name and must be of the TSIG record's algorithm.
func (r *Keyring) Generate(msg []byte, t *dns.TSIG) ([]byte, error) {
	k, ok := r.Get(t.Hdr.Name)
	if !ok {
		return nil, dns.ErrSecret
	}
	if dns.CanonicalName(t.Algorithm) != k.Algorithm {
		return nil, dns.ErrKeyAlg
	}
	return k.MAC(msg)
}

// Verify implements [dns.TsigProvider]. It returns dns.ErrSecret for an
// unknown key (BADKEY), dns.ErrKeyAlg for an algorithm the key is not for
// (BADKEY) and dns.ErrSig for a wrong MAC (BADSIG).
func (r *Keyring) Verify(msg []byte, t *dns.TSIG) error {
	want, err := r.Generate(msg, t)
	if err != nil {
		return err
	}
	got, err := hex.DecodeString(t.MAC)
	if err != nil || !hmac.Equal(want, got) {
		return dns.ErrSig
	}
	return nil
}
