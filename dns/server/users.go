package server

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// ErrBadUser is returned for a user name that is not a single lower-case
// DNS label (letters, digits, hyphen).
var ErrBadUser = errors.New("server: bad user name")

var userRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Users manages the TSIG keys in a directory, one BIND key file (mode 0600)
// per key: the user's own key, keys/alice.key, named "alice.btmm.example.",
// and the keys of the user's hosts, keys/alice/laptop.key, each named after
// its host, "laptop.alice.btmm.example.". It needs no running server (the
// admin commands use it directly).
type Users struct {
	Dir  string // DataDir/keys
	Zone string // canonical zone
	// ServerName is the server's own name: no user or host may own it.
	ServerName string
}

// NewUsers returns the user key directory of a data dir (server name
// "ns.<zone>"; set ServerName for another).
func NewUsers(dataDir, zone string) *Users {
	z := strings.ToLower(dns.CanonicalName(zone))
	return &Users{Dir: filepath.Join(dataDir, "keys"), Zone: z, ServerName: "ns." + z}
}

// UsersOf returns the key directory of a server configuration.
func UsersOf(cfg Config) *Users {
	u := NewUsers(cfg.DataDir, cfg.Zone)
	if cfg.ServerName != "" {
		u.ServerName = strings.ToLower(dns.CanonicalName(cfg.ServerName))
	}
	return u
}

// KeyName returns the TSIG key name of a user.
func (u *Users) KeyName(user string) string { return user + "." + u.Zone }

func (u *Users) path(user string) string { return filepath.Join(u.Dir, user+".key") }

// ErrReserved is returned for a user or host whose names would include
// the server's own.
var ErrReserved = errors.New("server: name reserved")

// owns refuses a domain that is the server's name or above it.
func (u *Users) owns(domain string) error {
	if u.ServerName != "" && dns.IsSubDomain(domain, dns.CanonicalName(u.ServerName)) {
		return fmt.Errorf("%w: %s would own the server's name %s", ErrReserved, domain, u.ServerName)
	}
	return nil
}

// Add creates the user with a fresh key of the given algorithm (default
// hmac-sha256) and returns it. An existing user is an error.
func (u *Users) Add(user, algorithm string) (tsig.Key, error) {
	if !userRE.MatchString(user) {
		return tsig.Key{}, fmt.Errorf("%w %q", ErrBadUser, user)
	}
	if err := u.owns(u.KeyName(user)); err != nil {
		return tsig.Key{}, err
	}
	if err := os.MkdirAll(u.Dir, 0o700); err != nil {
		return tsig.Key{}, fmt.Errorf("server: add user: %w", err)
	}
	if _, err := os.Stat(u.path(user)); err == nil {
		return tsig.Key{}, fmt.Errorf("server: add user %q: already exists", user)
	}
	k, err := tsig.NewKey(u.KeyName(user), algorithm)
	if err != nil {
		return tsig.Key{}, fmt.Errorf("server: add user %q: %w", user, err)
	}
	if err := tsig.WriteFile(u.path(user), k); err != nil {
		return tsig.Key{}, fmt.Errorf("server: add user %q: %w", user, err)
	}
	return k, nil
}

// Install stores a given key for its user (the key name must be
// "<user>.<zone>"). An existing different key for that user is an error.
func (u *Users) Install(k tsig.Key) error {
	name := strings.ToLower(dns.CanonicalName(k.Name))
	user, ok := strings.CutSuffix(name, "."+u.Zone)
	if !ok || !userRE.MatchString(user) {
		return fmt.Errorf("%w: key %q is not <user>.%s", ErrBadUser, k.Name, u.Zone)
	}
	if _, err := tsig.ParseAlgorithm(k.Algorithm); err != nil || len(k.Secret) == 0 {
		return fmt.Errorf("server: install key for %q: bad algorithm or empty secret", user)
	}
	k.Name = name
	if old, err := u.Get(user); err == nil {
		if old.Algorithm != dns.CanonicalName(k.Algorithm) && old.Algorithm != k.Algorithm || string(old.Secret) != string(k.Secret) {
			return fmt.Errorf("server: install key for %q: a different key exists", user)
		}
		return nil
	}
	if err := os.MkdirAll(u.Dir, 0o700); err != nil {
		return fmt.Errorf("server: install key: %w", err)
	}
	if err := tsig.WriteFile(u.path(user), k); err != nil {
		return fmt.Errorf("server: install key for %q: %w", user, err)
	}
	return nil
}

// Remove deletes the user's key file and those of its hosts.
func (u *Users) Remove(user string) error {
	if !userRE.MatchString(user) {
		return fmt.Errorf("%w %q", ErrBadUser, user)
	}
	if err := os.Remove(u.path(user)); err != nil {
		return fmt.Errorf("server: remove user %q: %w", user, err)
	}
	if err := os.RemoveAll(filepath.Join(u.Dir, user)); err != nil {
		return fmt.Errorf("server: remove hosts of user %q: %w", user, err)
	}
	return nil
}

// Get reads the user's key.
func (u *Users) Get(user string) (tsig.Key, error) {
	if !userRE.MatchString(user) {
		return tsig.Key{}, fmt.Errorf("%w %q", ErrBadUser, user)
	}
	k, err := tsig.ReadFile(u.path(user))
	if err != nil {
		return tsig.Key{}, fmt.Errorf("server: user %q: %w", user, err)
	}
	if k.Name != u.KeyName(user) {
		return tsig.Key{}, fmt.Errorf("server: user %q: key file names key %q", user, k.Name)
	}
	return k, nil
}

// List returns the user names with a key file.
func (u *Users) List() ([]string, error) {
	ents, err := os.ReadDir(u.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("server: list users: %w", err)
	}
	var out []string
	for _, e := range ents {
		if n, ok := strings.CutSuffix(e.Name(), ".key"); ok && userRE.MatchString(n) {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out, nil
}

// ErrBadHost is returned for a host name that is not a single lower-case
// DNS label, or that is reserved: "autotunnel-..." is the namespace of the
// hosts' SRV target names (RFC 6281 §3), which a host's key may hold.
var ErrBadHost = errors.New("server: bad host name")

// HostKeyName returns the TSIG key name of a user's host, which is the
// host's own name ("laptop.alice.btmm.example.").
func (u *Users) HostKeyName(user, host string) string { return host + "." + u.KeyName(user) }

func (u *Users) hostPath(user, host string) string {
	return filepath.Join(u.Dir, user, host+".key")
}

func checkHost(host string) error {
	if !userRE.MatchString(host) || strings.HasPrefix(host, "autotunnel-") {
		return fmt.Errorf("%w %q", ErrBadHost, host)
	}
	return nil
}

// Principal returns the user and host ("" for the user's own key) a key
// name stands for, by its shape; ok is false for any other name.
func (u *Users) Principal(keyName string) (user, host string, ok bool) {
	rest, found := strings.CutSuffix(strings.ToLower(dns.CanonicalName(keyName)), "."+u.Zone)
	if !found {
		return "", "", false
	}
	labels := strings.Split(rest, ".")
	switch {
	case len(labels) == 1 && userRE.MatchString(labels[0]):
		return labels[0], "", true
	case len(labels) == 2 && userRE.MatchString(labels[1]) && checkHost(labels[0]) == nil:
		return labels[1], labels[0], true
	}
	return "", "", false
}

// AddHost creates a key for host of user (who must exist) and returns it.
// The key may change only the host's own names (docs/dnsd.md).
func (u *Users) AddHost(user, host, algorithm string) (tsig.Key, error) {
	if _, err := u.Get(user); err != nil {
		return tsig.Key{}, fmt.Errorf("server: add host: %w", err)
	}
	if err := checkHost(host); err != nil {
		return tsig.Key{}, err
	}
	if err := u.owns(u.HostKeyName(user, host)); err != nil {
		return tsig.Key{}, err
	}
	if err := os.MkdirAll(filepath.Join(u.Dir, user), 0o700); err != nil {
		return tsig.Key{}, fmt.Errorf("server: add host: %w", err)
	}
	if _, err := os.Stat(u.hostPath(user, host)); err == nil {
		return tsig.Key{}, fmt.Errorf("server: add host %s of %s: already exists", host, user)
	}
	k, err := tsig.NewKey(u.HostKeyName(user, host), algorithm)
	if err != nil {
		return tsig.Key{}, fmt.Errorf("server: add host %s of %s: %w", host, user, err)
	}
	if err := tsig.WriteFile(u.hostPath(user, host), k); err != nil {
		return tsig.Key{}, fmt.Errorf("server: add host %s of %s: %w", host, user, err)
	}
	return k, nil
}

// GetHost reads a host's key.
func (u *Users) GetHost(user, host string) (tsig.Key, error) {
	if !userRE.MatchString(user) {
		return tsig.Key{}, fmt.Errorf("%w %q", ErrBadUser, user)
	}
	if err := checkHost(host); err != nil {
		return tsig.Key{}, err
	}
	k, err := tsig.ReadFile(u.hostPath(user, host))
	if err != nil {
		return tsig.Key{}, fmt.Errorf("server: host %s of %s: %w", host, user, err)
	}
	if k.Name != u.HostKeyName(user, host) {
		return tsig.Key{}, fmt.Errorf("server: host %s of %s: key file names key %q", host, user, k.Name)
	}
	return k, nil
}

// RemoveHost deletes a host's key file.
func (u *Users) RemoveHost(user, host string) error {
	if !userRE.MatchString(user) {
		return fmt.Errorf("%w %q", ErrBadUser, user)
	}
	if err := checkHost(host); err != nil {
		return err
	}
	if err := os.Remove(u.hostPath(user, host)); err != nil {
		return fmt.Errorf("server: remove host %s of %s: %w", host, user, err)
	}
	return nil
}

// Hosts returns the hosts of user with a key file.
func (u *Users) Hosts(user string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(u.Dir, user))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("server: list hosts of %s: %w", user, err)
	}
	var out []string
	for _, e := range ents {
		if n, ok := strings.CutSuffix(e.Name(), ".key"); ok && checkHost(n) == nil {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out, nil
}

// Keys returns every key on disk: each user's and each of its hosts'.
func (u *Users) Keys() ([]tsig.Key, error) {
	users, err := u.List()
	if err != nil {
		return nil, err
	}
	var out []tsig.Key
	for _, user := range users {
		k, err := u.Get(user)
		if err != nil {
			return nil, err
		}
		out = append(out, k)
		hosts, err := u.Hosts(user)
		if err != nil {
			return nil, err
		}
		for _, h := range hosts {
			k, err := u.GetHost(user, h)
			if err != nil {
				return nil, err
			}
			out = append(out, k)
		}
	}
	return out, nil
}

// Load reads the key named name, a user's or a host's.
func (u *Users) Load(name string) (tsig.Key, error) {
	user, host, ok := u.Principal(name)
	if !ok {
		return tsig.Key{}, fmt.Errorf("server: no key %q", name)
	}
	if host == "" {
		return u.Get(user)
	}
	return u.GetHost(user, host)
}
