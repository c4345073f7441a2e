package server

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// Keys: each user's own key and its hosts' keys (users.go stores them).
// The server keeps them in its keyring and an index of each user's hosts
// (for the zone's authorization: zone/auth.go). Removing a key removes what
// it stands for at once: its LLQs, and the records of the host (or user).

// hostIndex is the set of hosts with a key, per user.
type hostIndex struct {
	mu sync.Mutex
	m  map[string]map[string]bool
}

func (s *Server) indexKey(name string, add bool) {
	user, host, ok := s.users.Principal(name)
	if !ok || host == "" {
		return
	}
	s.hosts.mu.Lock()
	defer s.hosts.mu.Unlock()
	if s.hosts.m == nil {
		s.hosts.m = map[string]map[string]bool{}
	}
	if add {
		if s.hosts.m[user] == nil {
			s.hosts.m[user] = map[string]bool{}
		}
		s.hosts.m[user][host] = true
		return
	}
	delete(s.hosts.m[user], host)
	if len(s.hosts.m[user]) == 0 {
		delete(s.hosts.m, user)
	}
}

// hostsOf returns the hosts of user that have a key loaded.
func (s *Server) hostsOf(user string) []string {
	s.hosts.mu.Lock()
	defer s.hosts.mu.Unlock()
	out := make([]string, 0, len(s.hosts.m[user]))
	for h := range s.hosts.m[user] {
		out = append(out, h)
	}
	sort.Strings(out)
	return out
}

// isUser reports whether user has a key loaded (its subdomain is then a
// zone). A user added on disk while running is loaded at its key's first
// use or at a reload.
func (s *Server) isUser(user string) bool { return s.keys.Has(s.users.KeyName(user)) }

// loadKey is the keyring's miss hook: a key added on disk while running
// (adduser, addhost) is loaded at its first use.
func (s *Server) loadKey(name string) (tsig.Key, bool) {
	k, err := s.users.Load(name)
	if err != nil {
		return tsig.Key{}, false
	}
	s.indexKey(k.Name, true)
	return k, true
}

func (s *Server) installKey(k tsig.Key) {
	s.keys.Add(k)
	s.indexKey(k.Name, true)
}

// dropKey forgets a removed key: keyring, index, replay state, its LLQs.
func (s *Server) dropKey(name string) {
	s.keys.Remove(name)
	s.indexKey(name, false)
	s.verifier.Forget(name)
	if s.llq != nil {
		s.llq.DropKey(name)
	}
}

// ReloadKeys re-reads the key directory (after adduser, addhost, deluser,
// delhost; SIGHUP). A key that is gone is dropped with everything it stands
// for: its LLQs end, and the records of its host (or user) are removed
// (pushed to the remaining LLQs as removals).
func (s *Server) ReloadKeys() error {
	keys, err := s.users.Keys()
	if err != nil {
		return err
	}
	want := map[string]bool{}
	for _, k := range keys {
		s.installKey(k)
		want[k.Name] = true
	}
	var errs []error
	for _, n := range s.keys.Names() {
		if want[n] {
			continue
		}
		s.dropKey(n)
		if s.store != nil {
			if _, err := s.purgeKey(n); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("server: reload keys: %v", errs)
	}
	return nil
}

// AddUser creates a user with a fresh TSIG key (algorithm "" means
// hmac-sha256; "hmac-md5" and "hmac-sha512" work too), stores it (0600) and
// returns it. The key is usable at once.
func (s *Server) AddUser(user, algorithm string) (tsig.Key, error) {
	k, err := s.users.Add(user, algorithm)
	if err != nil {
		return k, err
	}
	s.installKey(k)
	return k, nil
}

// AddHost creates a key for a host of an existing user; it may change only
// the host's own names (zone/auth.go). The key is usable at once.
func (s *Server) AddHost(user, host, algorithm string) (tsig.Key, error) {
	k, err := s.users.AddHost(user, host, algorithm)
	if err != nil {
		return k, err
	}
	s.installKey(k)
	return k, nil
}

// RemoveUser deletes a user's key and its hosts' keys, ends their LLQs
// and removes every record of the user's zone; it returns how many.
func (s *Server) RemoveUser(user string) (int, error) {
	hosts, _ := s.users.Hosts(user)
	if err := s.users.Remove(user); err != nil {
		return 0, err
	}
	for _, h := range hosts {
		s.dropKey(s.users.HostKeyName(user, h))
	}
	for _, h := range s.hostsOf(user) {
		s.dropKey(s.users.HostKeyName(user, h))
	}
	name := s.users.KeyName(user)
	s.dropKey(name)
	return s.purgeKey(name)
}

// RemoveHost deletes a host's key, ends its LLQs and removes the host's
// records (its names, its PTR in the browse RRset, its SRV target's
// address) at once; it returns how many.
func (s *Server) RemoveHost(user, host string) (int, error) {
	if err := s.users.RemoveHost(user, host); err != nil {
		return 0, err
	}
	name := s.users.HostKeyName(user, host)
	s.dropKey(name)
	return s.purgeKey(name)
}

// purgeKey removes the records of what the key name stands for: every
// record at or below its domain (the host's, or the user's zone) and every
// record it wrote.
func (s *Server) purgeKey(name string) (int, error) {
	name = strings.ToLower(dns.CanonicalName(name))
	if _, _, ok := s.users.Principal(name); !ok {
		return 0, nil
	}
	match := func(r store.Record) bool {
		return dns.IsSubDomain(name, r.RR.Header().Name) || strings.EqualFold(r.Owner, name)
	}
	all, _ := s.store.All()
	names := map[string]bool{}
	for _, r := range all {
		if match(r) {
			names[strings.ToLower(r.RR.Header().Name)] = true
		}
	}
	if len(names) == 0 {
		return 0, nil
	}
	n := 0
	ctx, cancel := context.WithTimeout(s.life, 30*time.Second)
	defer cancel()
	_, err := s.store.Update(ctx, func(v store.View) ([]store.Op, error) {
		var ops []store.Op
		for nm := range names {
			for _, r := range v.Name(nm) {
				if match(r) {
					ops = append(ops, store.Op{Kind: store.Delete, Record: r})
				}
			}
		}
		n = len(ops)
		return ops, nil
	})
	if err != nil {
		return 0, fmt.Errorf("server: remove records of %s: %w", name, err)
	}
	s.log.Info("removed the records of a deleted key", "key", name, "records", n)
	return n, nil
}
