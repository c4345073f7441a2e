// Package etcdstore is btmm-dnsd's store.Store on an etcd cluster (etcd v3
// API, go.etcd.io/etcd/client/v3), so that several btmm-dnsd replicas serve
// one rendezvous zone.
//
// Layout under Config.Prefix (default "/btmm/"):
//
//	n/<owner name>  JSON list of the records owned by that name
//	g/<guard>       bumped by every transaction that writes a name of that guard
//	replicas/<name> a live replica (store.Server JSON), bound to its session lease
//	expirer         the election of the one lease expirer (concurrency.Election)
//
// Every replica keeps a cache of n/ and g/ fed by one etcd Watch from the
// revision of its initial read, so reads are local and every replica sees
// every committed change in revision order: Watch (and so LLQ events) works
// across replicas. Update runs the caller's function against the cache and
// commits its writes in one etcd transaction whose conditions are the mod
// revisions of the guards of every name the function read or wrote (the
// server's guard is the user, whose subtree holds all names an update may
// touch): a concurrent conflicting commit makes the condition fail and the
// function is run again on the newer cache (optimistic concurrency, as
// etcd's STM). Update returns after etcd committed and the local cache has
// applied the commit, so a client that got NOERROR reads its write back from
// the same replica. Requests carry WithRequireLeader: a replica cut off from
// the etcd majority fails updates (SERVFAIL) instead of accepting what it
// cannot commit.
//
// LLQ state (Meta) is per replica and lives in a local embedded store.
package etcdstore

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Config configures Open.
type Config struct {
	Endpoints []string
	TLS       *tls.Config // nil: plain http endpoints
	Prefix    string      // default "/btmm/"
	// DialTimeout bounds connecting (default 5s); RequestTimeout bounds
	// one transaction (default 5s): an update that cannot commit by then
	// fails.
	DialTimeout, RequestTimeout time.Duration
	// SessionTTL is the lease of this replica's registration and election
	// entries (default 5s): a killed replica disappears after it.
	SessionTTL time.Duration
	// Guard maps an owner name to its conflict domain; all names one update
	// may read or write must map to guards it compares. Default: one guard
	// for everything (every update serialised).
	Guard func(name string) string
	// Local keeps this replica's Meta (LLQ state). Required.
	Local store.Store
	// DialOptions are extra gRPC options (tests dial from a namespace).
	DialOptions []grpc.DialOption
	Log         *slog.Logger
}

// Store is the etcd-backed store.
type Store struct {
	cfg    Config
	cli    *clientv3.Client
	log    *slog.Logger
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	cond    *sync.Cond // broadcast when rev advances or the store closes
	closed  bool
	rev     int64
	idx     *store.Index
	guards  map[string]int64 // guard -> mod revision
	watches map[*store.Watcher]struct{}
	werr    error // the watch's last error, while it is down

	// rmu guards replicas apart from mu: the zone lists the replicas
	// while answering from a view (under mu).
	rmu      sync.Mutex
	replicas map[string]store.Server
}

// Errors.
var (
	ErrNotLeader = errors.New("etcdstore: no longer the elected leader")
)

// Open connects, reads everything under the prefix and starts following it.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcdstore: no endpoints")
	}
	if cfg.Local == nil {
		return nil, errors.New("etcdstore: no local store for LLQ state")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "/btmm/"
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	if cfg.SessionTTL == 0 {
		cfg.SessionTTL = 5 * time.Second
	}
	if cfg.Guard == nil {
		cfg.Guard = func(string) string { return "" }
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: cfg.Endpoints, TLS: cfg.TLS, DialTimeout: cfg.DialTimeout,
		DialKeepAliveTime: 2 * time.Second, DialKeepAliveTimeout: 2 * time.Second, Logger: zapNop(), DialOptions: cfg.DialOptions})
	if err != nil {
		return nil, fmt.Errorf("etcdstore: connect %v: %w", cfg.Endpoints, err)
	}
	s := &Store{cfg: cfg, cli: cli, log: log, done: make(chan struct{}), guards: map[string]int64{},
		replicas: map[string]store.Server{}, watches: map[*store.Watcher]struct{}{}, idx: store.NewIndex()}
	s.cond = sync.NewCond(&s.mu)
	if err := s.load(ctx); err != nil {
		cli.Close()
		return nil, err
	}
	wctx, wcancel := context.WithCancel(context.Background())
	s.cancel = wcancel
	go s.follow(wctx)
	return s, nil
}

// record is the stored form of one record.
type record struct {
	RR      string `json:"rr"`
	Expires int64  `json:"exp,omitempty"` // unix nanoseconds
	Owner   string `json:"owner,omitempty"`
}

func encodeRecords(rs []store.Record) []byte {
	out := make([]record, len(rs))
	for i, r := range rs {
		out[i] = record{RR: r.RR.String(), Owner: r.Owner}
		if !r.Expires.IsZero() {
			out[i].Expires = r.Expires.UnixNano()
		}
	}
	b, _ := json.Marshal(out)
	return b
}

func decodeRecords(b []byte) ([]store.Record, error) {
	var in []record
	if err := json.Unmarshal(b, &in); err != nil {
		return nil, err
	}
	out := make([]store.Record, 0, len(in))
	for _, r := range in {
		rr, err := dns.NewRR(r.RR)
		if err != nil || rr == nil {
			return nil, fmt.Errorf("record %q: %v", r.RR, err)
		}
		rec := store.Record{RR: rr, Owner: r.Owner}
		if r.Expires != 0 {
			rec.Expires = time.Unix(0, r.Expires)
		}
		out = append(out, rec)
	}
	return out, nil
}

func lname(n string) string { return strings.ToLower(dns.CanonicalName(n)) }

func (s *Store) nameKey(name string) string   { return s.cfg.Prefix + "n/" + lname(name) }
func (s *Store) guardKey(guard string) string { return s.cfg.Prefix + "g/" + guard }

// loadPage is how many keys one read of load returns (a name key holds a
// few hundred bytes: a page is well under a megabyte).
var loadPage int64 = 2000

// loadPageHook, when set (tests), runs after each page load read.
var loadPageHook func(page int)

// load reads the whole prefix into a fresh cache and emits the difference
// to the old one as a change (used at start and after the watch fell
// behind a compaction). It reads in pages of loadPage keys, every page at
// the revision of the first, so the cache is the prefix exactly as of one
// revision and the watch resumes from the next; each page has its own
// RequestTimeout, so a large store loads as long as reads make progress.
// A compaction past that revision during the load starts it again.
func (s *Store) load(ctx context.Context) error {
	for attempt := 1; ; attempt++ {
		err := s.loadAt(ctx)
		if err == nil || !errors.Is(err, rpctypes.ErrCompacted) || attempt == 3 {
			return err
		}
		s.log.Warn("etcd: compacted during the initial read; reading again", "err", err)
	}
}

func (s *Store) loadAt(ctx context.Context) error {
	idx := store.NewIndex()
	guards := map[string]int64{}
	replicas := map[string]store.Server{}
	var rev int64
	key, end := s.cfg.Prefix, clientv3.GetPrefixRangeEnd(s.cfg.Prefix)
	for page := 0; ; page++ {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(loadPage)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		pctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
		resp, err := s.cli.Get(clientv3.WithRequireLeader(pctx), key, opts...)
		cancel()
		if err != nil {
			return fmt.Errorf("etcdstore: read %s (page %d, at revision %d): %w", s.cfg.Prefix, page, rev, err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			k := strings.TrimPrefix(string(kv.Key), s.cfg.Prefix)
			switch {
			case strings.HasPrefix(k, "n/"):
				recs, err := decodeRecords(kv.Value)
				if err != nil {
					return fmt.Errorf("etcdstore: key %s: %w", kv.Key, err)
				}
				for _, r := range recs {
					idx.Put(r)
				}
			case strings.HasPrefix(k, "g/"):
				guards[k[2:]] = kv.ModRevision
			case strings.HasPrefix(k, "replicas/"):
				var sv store.Server
				if json.Unmarshal(kv.Value, &sv) == nil {
					replicas[k] = sv
				}
			}
		}
		if loadPageHook != nil {
			loadPageHook(page)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.idx
	var ch store.Change
	oldAll, newAll := map[string]store.Record{}, map[string]store.Record{}
	for _, r := range old.All() {
		oldAll[r.Key()] = r
	}
	for _, r := range idx.All() {
		newAll[r.Key()] = r
		if o, ok := oldAll[r.Key()]; !ok {
			ch.Added = append(ch.Added, r)
		} else if refreshed(o, r) {
			ch.Refreshed = append(ch.Refreshed, r)
		}
	}
	for k, r := range oldAll {
		if _, ok := newAll[k]; !ok {
			ch.Removed = append(ch.Removed, r)
		}
	}
	s.idx, s.guards = idx, guards
	s.rmu.Lock()
	s.replicas = replicas
	s.rmu.Unlock()
	s.rev = rev
	ch.Rev = uint64(s.rev)
	if s.rev != 0 && len(ch.Added)+len(ch.Removed)+len(ch.Refreshed) > 0 && len(oldAll) > 0 {
		s.notify(ch)
	}
	s.cond.Broadcast()
	return nil
}

func refreshed(a, b store.Record) bool {
	return a.RR.Header().Ttl != b.RR.Header().Ttl || !a.Expires.Equal(b.Expires) || a.Owner != b.Owner
}

// follow applies the watch to the cache until ctx ends, re-watching after
// errors and reloading after a compaction overtook it.
func (s *Store) follow(ctx context.Context) {
	defer close(s.done)
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		s.mu.Lock()
		from := s.rev + 1
		s.mu.Unlock()
		wch := s.cli.Watch(clientv3.WithRequireLeader(ctx), s.cfg.Prefix, clientv3.WithPrefix(), clientv3.WithRev(from),
			clientv3.WithProgressNotify())
		for resp := range wch {
			if err := resp.Err(); err != nil {
				s.setWatchErr(err)
				if resp.CompactRevision != 0 {
					s.log.Warn("etcd watch overtaken by compaction; reloading", "rev", from, "compacted", resp.CompactRevision)
					if err := s.load(ctx); err != nil {
						s.log.Warn("etcd reload failed", "err", err)
					}
				}
				break
			}
			backoff = 100 * time.Millisecond
			s.apply(resp)
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Debug("etcd watch ended; watching again", "from", from)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

func (s *Store) setWatchErr(err error) {
	s.mu.Lock()
	s.werr = err
	s.mu.Unlock()
}

// apply folds one watch response into the cache, one change per revision.
func (s *Store) apply(resp clientv3.WatchResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.werr = nil
	var ch store.Change
	flush := func() {
		if ch.Rev == 0 {
			return
		}
		if len(ch.Added)+len(ch.Removed)+len(ch.Refreshed) > 0 {
			s.notify(ch)
		}
		s.rev = max(s.rev, int64(ch.Rev))
		ch = store.Change{}
	}
	for _, ev := range resp.Events {
		rev := ev.Kv.ModRevision
		if uint64(rev) != ch.Rev {
			flush()
			ch.Rev = uint64(rev)
		}
		k := strings.TrimPrefix(string(ev.Kv.Key), s.cfg.Prefix)
		del := ev.Type == clientv3.EventTypeDelete
		switch {
		case strings.HasPrefix(k, "n/"):
			var next []store.Record
			if !del {
				var err error
				if next, err = decodeRecords(ev.Kv.Value); err != nil {
					s.log.Error("etcd: undecodable records; ignored", "key", string(ev.Kv.Key), "err", err)
					continue
				}
			}
			s.replaceName(k[2:], next, &ch)
		case strings.HasPrefix(k, "g/"):
			if del {
				delete(s.guards, k[2:])
			} else {
				s.guards[k[2:]] = rev
			}
		case strings.HasPrefix(k, "replicas/"):
			var sv store.Server
			s.rmu.Lock()
			if del {
				delete(s.replicas, k)
			} else if json.Unmarshal(ev.Kv.Value, &sv) == nil {
				s.replicas[k] = sv
			}
			s.rmu.Unlock()
		}
	}
	flush()
	if resp.Header.Revision > s.rev && len(resp.Events) == 0 {
		s.rev = resp.Header.Revision // progress notification: nothing of ours changed
	}
	s.cond.Broadcast()
}

// replaceName sets name's records to next, recording the difference in ch.
func (s *Store) replaceName(name string, next []store.Record, ch *store.Change) {
	old := map[string]store.Record{}
	for _, r := range s.idx.Name(name) {
		old[r.Key()] = r
	}
	seen := map[string]bool{}
	for _, r := range next {
		k := r.Key()
		seen[k] = true
		if o, ok := old[k]; !ok {
			ch.Added = append(ch.Added, r)
		} else if refreshed(o, r) {
			ch.Refreshed = append(ch.Refreshed, r)
		}
		s.idx.Put(r)
	}
	for k, r := range old {
		if !seen[k] {
			ch.Removed = append(ch.Removed, r)
			s.idx.Delete(r.RR)
		}
	}
}

// trackingView is the cache as an update function sees it; it records the
// names read, whose guards the transaction then compares.
type trackingView struct {
	s    *Store
	read map[string]bool
}

func (v *trackingView) Name(name string) []store.Record {
	v.read[lname(name)] = true
	return v.s.idx.Name(name)
}

func (v *trackingView) HasDescendants(name string) bool {
	v.read[lname(name)] = true
	return v.s.idx.HasDescendants(name)
}

func (v *trackingView) Rev() uint64 { return uint64(v.s.rev) }

// guards are the guards of the names read (called with s.mu held).
func (v *trackingView) guards(s *Store) map[string]bool {
	out := map[string]bool{}
	for n := range v.read {
		out[s.cfg.Guard(n)] = true
	}
	return out
}

// stale reports whether etcd holds newer writes to the guards than the
// cache (called without s.mu; it is taken and released inside). When it
// does, it waits until the cache has them, so the caller can run again.
func (s *Store) stale(ctx context.Context, guards map[string]bool) (bool, error) {
	var newest int64
	stale := false
	for g := range guards {
		mod, err := s.guardRev(ctx, g)
		if err != nil {
			return false, err
		}
		s.mu.Lock()
		if s.guards[g] != mod {
			stale = true
		}
		s.mu.Unlock()
		newest = max(newest, mod)
	}
	if !stale {
		return false, nil
	}
	return true, s.waitRev(ctx, newest)
}

type fenceKey struct{}

type fence struct {
	key string
	rev int64
}

// Update implements store.Store.
func (s *Store) Update(ctx context.Context, fn func(store.View) ([]store.Op, error)) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return 0, store.ErrClosed
		}
		v := &trackingView{s: s, read: map[string]bool{}}
		ops, err := fn(v)
		if err != nil {
			// A refusal (a failed prerequisite) is only as good as the
			// cache it was computed on: confirm the cache was current.
			read := v.guards(s)
			s.mu.Unlock()
			stale, ferr := s.stale(ctx, read)
			if ferr != nil {
				// Unconfirmed, the refusal may be wrong: not its rcode
				// (err is not wrapped) but a failure.
				return 0, fmt.Errorf("etcdstore: update: could not confirm the refusal %q: %w", err.Error(), ferr)
			}
			if !stale {
				return 0, err
			}
			continue
		}
		// The names written, with their records after the ops.
		next := map[string]map[string]store.Record{}
		for _, op := range ops {
			if op.Record.RR == nil {
				s.mu.Unlock()
				return 0, errors.New("etcdstore: update: op without RR")
			}
			n := lname(op.Record.RR.Header().Name)
			m, ok := next[n]
			if !ok {
				m = map[string]store.Record{}
				for _, r := range s.idx.Name(n) {
					m[r.Key()] = r
				}
				next[n] = m
			}
			switch op.Kind {
			case store.Put:
				r := op.Record
				r.RR = dns.Copy(r.RR)
				m[r.Key()] = r
			case store.Delete:
				delete(m, op.Record.Key())
			default:
				s.mu.Unlock()
				return 0, fmt.Errorf("etcdstore: update: bad op kind %d", op.Kind)
			}
		}
		guards := map[string]bool{}
		for n := range v.read {
			guards[s.cfg.Guard(n)] = true
		}
		var then []clientv3.Op
		changed := false
		names := make([]string, 0, len(next))
		for n := range next {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			m := next[n]
			if !sameRecords(s.idx.Name(n), m) {
				changed = true
			}
			guards[s.cfg.Guard(n)] = true
			if len(m) == 0 {
				then = append(then, clientv3.OpDelete(s.nameKey(n)))
				continue
			}
			keys := make([]string, 0, len(m))
			for k := range m {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			recs := make([]store.Record, len(keys))
			for i, k := range keys {
				recs[i] = m[k]
			}
			then = append(then, clientv3.OpPut(s.nameKey(n), string(encodeRecords(recs))))
		}
		rev := s.rev
		if !changed {
			// A no-op commits nothing, as in the embedded store; but the
			// cache must have been current.
			s.mu.Unlock()
			stale, err := s.stale(ctx, guards)
			if err != nil {
				return 0, fmt.Errorf("etcdstore: update: %w", err)
			}
			if !stale {
				return uint64(rev), nil
			}
			continue
		}
		// Each transaction writes its own id into its guards, so that after
		// an ambiguous failure (the connection broke after sending) it can
		// tell whether it committed.
		id := txnID()
		var cmps []clientv3.Cmp
		var probe string
		var probeRev int64
		for g := range guards {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.guardKey(g)), "=", s.guards[g]))
			then = append(then, clientv3.OpPut(s.guardKey(g), id))
			probe, probeRev = s.guardKey(g), s.guards[g]
		}
		f, fenced := ctx.Value(fenceKey{}).(fence)
		if fenced {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(f.key), "=", f.rev))
		}
		s.mu.Unlock()

		// Commit. A try that gets no answer may still commit (its
		// proposal was in flight when the connection or the leader
		// died), so after one the transaction's id in the probe guard
		// tells whether it did before anything is tried again.
		var resp *clientv3.TxnResponse
		ambiguous, conflict := false, false
		for d := firstTry; ; d = min(2*d, s.cfg.RequestTimeout) {
			tctx, tcancel := context.WithTimeout(ctx, d)
			resp, err = s.cli.Txn(clientv3.WithRequireLeader(tctx)).If(cmps...).Then(then...).Commit()
			tcancel()
			if err == nil && (resp.Succeeded || !ambiguous) {
				conflict = !resp.Succeeded
				break
			}
			if err != nil && ctx.Err() != nil {
				return 0, fmt.Errorf("etcdstore: update: not committed: %w", errors.Join(err, ctx.Err()))
			}
			if err != nil && !transient(err) {
				return 0, fmt.Errorf("etcdstore: update: %w", err)
			}
			if err != nil {
				ambiguous = true
				s.log.Debug("etcd transaction unanswered; looking whether it committed", "err", err, "try", d)
			}
			var rev int64
			var done, moved bool
			if cerr := s.try(ctx, func(ctx context.Context) (err error) {
				rev, done, moved, err = s.committed(ctx, probe, probeRev, id)
				return err
			}); cerr != nil {
				return 0, fmt.Errorf("etcdstore: update: not committed: %w", errors.Join(err, cerr))
			}
			if done {
				if err := s.waitRev(ctx, rev); err != nil {
					return 0, err
				}
				return uint64(rev), nil
			}
			if moved || err == nil {
				// Another transaction wrote the guard first, or (guard
				// unmoved, condition failed) the fence.
				conflict = true
				break
			}
			if !sleep(ctx, 50*time.Millisecond) {
				return 0, fmt.Errorf("etcdstore: update: not committed: %w", errors.Join(err, ctx.Err()))
			}
		}
		if !conflict {
			if err := s.waitRev(ctx, resp.Header.Revision); err != nil {
				return 0, err
			}
			return uint64(resp.Header.Revision), nil
		}
		// A condition failed: a newer write to one of our guards (wait for
		// the cache to have it, then run fn again), or our fence.
		if fenced {
			var g *clientv3.GetResponse
			if err := s.try(ctx, func(ctx context.Context) (err error) {
				g, err = s.cli.Get(ctx, f.key)
				return err
			}); err != nil {
				return 0, fmt.Errorf("etcdstore: update: %w", err)
			}
			if len(g.Kvs) == 0 || g.Kvs[0].CreateRevision != f.rev {
				return 0, ErrNotLeader
			}
		}
		var newest int64
		for g := range guards {
			mod, err := s.guardRev(ctx, g)
			if err != nil {
				return 0, fmt.Errorf("etcdstore: update: %w", err)
			}
			newest = max(newest, mod)
		}
		if err := s.waitRev(ctx, newest); err != nil {
			return 0, err
		}
	}
}

// firstTry bounds the first try of one etcd request of an update; every
// further try gets twice as long, all within the update's RequestTimeout.
// A request a member took while its leader died is never answered (the
// proposal or read went to the dead leader, and the member stays its
// follower until the election timeout): only asking again, once the
// members elected another leader, gets through.
const firstTry = time.Second

// try runs op, each try with WithRequireLeader and its own deadline, until
// it succeeds, fails for another reason than etcd being unavailable or
// slow, or ctx ends.
func (s *Store) try(ctx context.Context, op func(ctx context.Context) error) error {
	for d := firstTry; ; d = min(2*d, s.cfg.RequestTimeout) {
		tctx, cancel := context.WithTimeout(ctx, d)
		err := op(clientv3.WithRequireLeader(tctx))
		cancel()
		if err == nil || !transient(err) {
			return err
		}
		if ctx.Err() != nil {
			return errors.Join(err, ctx.Err())
		}
		s.log.Debug("etcd request failed; trying again", "err", err, "try", d)
		if !sleep(ctx, 50*time.Millisecond) {
			return errors.Join(err, ctx.Err())
		}
	}
}

// transient reports whether err may go away by asking again: no answer in
// time, no connection, no leader (an election), too many requests.
func transient(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return true
	}
	code := status.Code(err)
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		code = ee.Code()
	}
	switch code {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted:
		return true
	}
	return false
}

// guardRev is the mod revision of guard g in etcd (0: never written).
func (s *Store) guardRev(ctx context.Context, g string) (int64, error) {
	var mod int64
	err := s.try(ctx, func(ctx context.Context) error {
		r, err := s.cli.Get(ctx, s.guardKey(g))
		if err == nil && len(r.Kvs) > 0 {
			mod = r.Kvs[0].ModRevision
		}
		return err
	})
	return mod, err
}

// txnID returns a fresh transaction id.
func txnID() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// committed finds out whether the transaction that wrote id into guard key
// (expecting its mod revision to be from) committed: done with its
// revision, or not (moved: another transaction wrote the guard since).
func (s *Store) committed(ctx context.Context, key string, from int64, id string) (rev int64, done, moved bool, err error) {
	g, err := s.cli.Get(ctx, key)
	if err != nil {
		return 0, false, false, err
	}
	if len(g.Kvs) == 0 || g.Kvs[0].ModRevision == from {
		return 0, false, false, nil
	}
	if string(g.Kvs[0].Value) == id {
		return g.Kvs[0].ModRevision, true, false, nil
	}
	// Written since: by us and then others, or by others only. The key's
	// history since from says which.
	now := g.Kvs[0].ModRevision
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for resp := range s.cli.Watch(wctx, key, clientv3.WithRev(from+1)) {
		if err := resp.Err(); err != nil {
			return 0, false, false, err
		}
		for _, ev := range resp.Events {
			if string(ev.Kv.Value) == id {
				return ev.Kv.ModRevision, true, false, nil
			}
			if ev.Kv.ModRevision >= now {
				return 0, false, true, nil
			}
		}
	}
	return 0, false, false, ctx.Err()
}

func sameRecords(old []store.Record, next map[string]store.Record) bool {
	if len(old) != len(next) {
		return false
	}
	for _, o := range old {
		n, ok := next[o.Key()]
		if !ok || refreshed(o, n) {
			return false
		}
	}
	return true
}

// waitRev waits until the cache reflects revision rev.
func (s *Store) waitRev(ctx context.Context, rev int64) error {
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	defer stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.rev < rev {
		if s.closed {
			return store.ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("etcdstore: committed at revision %d, not yet seen by this replica: %w", rev, err)
		}
		s.cond.Wait()
	}
	return nil
}

type view struct{ s *Store }

func (v view) Name(name string) []store.Record { return v.s.idx.Name(name) }
func (v view) HasDescendants(name string) bool { return v.s.idx.HasDescendants(name) }
func (v view) Rev() uint64                     { return uint64(v.s.rev) }

// Read implements store.Store (from this replica's cache).
func (s *Store) Read(fn func(store.View)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(view{s})
}

// All implements store.Store.
func (s *Store) All() ([]store.Record, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.idx.All(), uint64(s.rev)
}

func (s *Store) notify(c store.Change) {
	for w := range s.watches {
		w.Push(c)
	}
}

// Watch implements store.Store: every change committed by any replica.
func (s *Store) Watch(ctx context.Context) (<-chan store.Change, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := store.NewWatcher(ctx)
	if s.closed {
		w.Stop()
		return w.C(), uint64(s.rev)
	}
	s.watches[w] = struct{}{}
	go func() {
		<-ctx.Done()
		s.mu.Lock()
		delete(s.watches, w)
		s.mu.Unlock()
		w.Stop()
	}()
	return w.C(), uint64(s.rev)
}

// PutMeta implements store.Store (replica-local).
func (s *Store) PutMeta(key string, value []byte) error { return s.cfg.Local.PutMeta(key, value) }

// DeleteMeta implements store.Store (replica-local).
func (s *Store) DeleteMeta(key string) error { return s.cfg.Local.DeleteMeta(key) }

// Meta implements store.Store (replica-local).
func (s *Store) Meta(prefix string) (map[string][]byte, error) { return s.cfg.Local.Meta(prefix) }

// Sync implements store.Store: record writes are committed by etcd before
// Update returns; this syncs the local LLQ state.
func (s *Store) Sync() error { return s.cfg.Local.Sync() }

// Close implements store.Store.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for w := range s.watches {
		delete(s.watches, w)
		w.Stop()
	}
	s.cond.Broadcast()
	s.mu.Unlock()
	s.cancel()
	<-s.done
	err := s.cli.Close()
	if lerr := s.cfg.Local.Close(); err == nil {
		err = lerr
	}
	return err
}

// Lead implements store.Leader with an etcd election (concurrency.Election
// on <prefix>expirer): fn runs while this replica holds it; its ctx carries
// the election key as a fence that every Update made with it compares.
func (s *Store) Lead(ctx context.Context, fn func(ctx context.Context)) error {
	for ctx.Err() == nil {
		sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(int(s.cfg.SessionTTL/time.Second)),
			concurrency.WithContext(ctx))
		if err != nil {
			s.log.Debug("etcd election: no session; retrying", "err", err)
			if !sleep(ctx, time.Second) {
				return nil
			}
			continue
		}
		e := concurrency.NewElection(sess, s.cfg.Prefix+"expirer")
		if err := e.Campaign(ctx, "leader"); err != nil {
			sess.Close()
			if !sleep(ctx, time.Second) {
				return nil
			}
			continue
		}
		s.log.Info("elected the lease expirer", "key", e.Key())
		lctx, cancel := context.WithCancel(context.WithValue(ctx, fenceKey{}, fence{key: e.Key(), rev: e.Rev()}))
		go func() {
			select {
			case <-sess.Done():
			case <-lctx.Done():
			}
			cancel()
		}()
		fn(lctx)
		cancel()
		rctx, rcancel := context.WithTimeout(context.Background(), time.Second)
		e.Resign(rctx)
		rcancel()
		sess.Close()
		if ctx.Err() == nil {
			s.log.Info("lost the lease expirer election; campaigning again")
		}
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// Register implements store.Registry: self is published under
// <prefix>replicas/<name> on a lease kept alive until ctx ends; a killed
// replica's entry goes with its lease (SessionTTL).
func (s *Store) Register(ctx context.Context, self store.Server) error {
	val, _ := json.Marshal(self)
	key := s.cfg.Prefix + "replicas/" + lname(self.Name)
	for ctx.Err() == nil {
		sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(int(s.cfg.SessionTTL/time.Second)),
			concurrency.WithContext(ctx))
		if err == nil {
			pctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
			_, err = s.cli.Put(pctx, key, string(val), clientv3.WithLease(sess.Lease()))
			cancel()
			if err == nil {
				select {
				case <-ctx.Done():
					dctx, dcancel := context.WithTimeout(context.Background(), time.Second)
					s.cli.Delete(dctx, key)
					dcancel()
					sess.Close()
					return nil
				case <-sess.Done():
				}
			}
			sess.Close()
		}
		s.log.Debug("etcd: registration lost; registering again", "err", err)
		if !sleep(ctx, time.Second) {
			return nil
		}
	}
	return nil
}

// Servers implements store.Registry: the live replicas, by name.
func (s *Store) Servers() []store.Server {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	out := make([]store.Server, 0, len(s.replicas))
	for _, v := range s.replicas {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

var (
	_ store.Store    = (*Store)(nil)
	_ store.Leader   = (*Store)(nil)
	_ store.Registry = (*Store)(nil)
)

func zapNop() *zap.Logger { return zap.NewNop() }
