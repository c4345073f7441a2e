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

// Users manages the per-user TSIG keys in a directory (one BIND key file
// per user, mode 0600). The key of user alice in zone btmm.example. is named
// "alice.btmm.example.". It needs no running server (the admin commands use
// it directly).
type Users struct {
	Dir  string // DataDir/keys
	Zone string // canonical zone
}

// NewUsers returns the user key directory of a data dir.
func NewUsers(dataDir, zone string) *Users {
	return &Users{Dir: filepath.Join(dataDir, "keys"), Zone: strings.ToLower(dns.CanonicalName(zone))}
}

// KeyName returns the TSIG key name of a user.
func (u *Users) KeyName(user string) string { return user + "." + u.Zone }

func (u *Users) path(user string) string { return filepath.Join(u.Dir, user+".key") }

// Add creates the user with a fresh key of the given algorithm (default
// hmac-sha256) and returns it. An existing user is an error.
func (u *Users) Add(user, algorithm string) (tsig.Key, error) {
	if !userRE.MatchString(user) {
		return tsig.Key{}, fmt.Errorf("%w %q", ErrBadUser, user)
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

// Remove deletes the user's key file.
func (u *Users) Remove(user string) error {
	if !userRE.MatchString(user) {
		return fmt.Errorf("%w %q", ErrBadUser, user)
	}
	if err := os.Remove(u.path(user)); err != nil {
		return fmt.Errorf("server: remove user %q: %w", user, err)
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
