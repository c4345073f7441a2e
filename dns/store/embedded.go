package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// Embedded is the default Store: in memory with a write-ahead log.
type Embedded struct {
	dir    string
	onSync func(time.Duration) // Options.OnSync

	mu      sync.Mutex // serialises writers and guards everything below
	closed  bool
	rev     uint64
	names   map[string]map[string]Record // lower-case canonical owner name -> RR key -> record
	below   map[string]int               // name -> number of names strictly below it with records
	meta    map[string][]byte
	log     *os.File
	lock    *os.File // flock on dir/LOCK: one process per store
	logLen  int      // records in the log since the last snapshot
	watches map[*Watcher]struct{}

	syncMu    sync.Mutex // one fsync at a time (group commit); taken before mu
	writeSeq  uint64     // transactions written to the log
	syncedSeq uint64     // transactions known durable
	unsynced  []Change   // written, not yet durable nor delivered

	// CompactEvery is the number of log records after which a snapshot is
	// written and the log truncated. Default 10000.
	CompactEvery int
}

// walRecord is one log entry: a committed transaction or a meta change.
type walRecord struct {
	Rev  uint64            `json:"rev,omitempty"`
	Ops  []walOp           `json:"ops,omitempty"`
	Meta map[string][]byte `json:"meta,omitempty"` // nil value: delete
}

type walOp struct {
	Put     bool   `json:"put,omitempty"`
	RR      string `json:"rr"`
	Expires int64  `json:"exp,omitempty"` // unix nanoseconds
	Owner   string `json:"owner,omitempty"`
}

type snapshot struct {
	Rev     uint64            `json:"rev"`
	Records []walOp           `json:"records"`
	Meta    map[string][]byte `json:"meta"`
}

const (
	logName        = "wal.log"
	snapName       = "snapshot"      // one frame holding the snapshot JSON
	legacySnapName = "snapshot.json" // unframed, written before CRCs (read only)
)

// Options tune OpenOptions.
type Options struct {
	// Log gets the torn-tail warning (default: discarded).
	Log *slog.Logger
	// OnSync, if set, is called with the duration of each fsync of the
	// log that commits updates (for metrics).
	OnSync func(took time.Duration)
}

// Open opens (creating if needed) the embedded store in dir.
func Open(dir string) (*Embedded, error) { return OpenOptions(dir, Options{}) }

// OpenOptions opens (creating if needed) the embedded store in dir. A torn
// final log frame is discarded with a warning naming its offset and size;
// any other damage returns a *CorruptError (naming file and offset) and
// leaves every file as it was.
func OpenOptions(dir string, o Options) (*Embedded, error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: open: %w", err)
	}
	s := newMem(dir)
	s.onSync = o.OnSync
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	s.lock = lock
	rep, err := s.load()
	if err != nil {
		lock.Close()
		return nil, err
	}
	path := filepath.Join(dir, logName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("store: open log: %w", err)
	}
	if rep.TornBytes > 0 {
		log.Warn("store: discarding the torn last record of the log (an incomplete write, never acknowledged)",
			"file", path, "offset", rep.LogBytes-rep.TornBytes, "bytes", rep.TornBytes)
		if err := f.Truncate(rep.LogBytes - rep.TornBytes); err != nil {
			f.Close()
			lock.Close()
			return nil, fmt.Errorf("store: truncate torn log tail: %w", err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			lock.Close()
			return nil, fmt.Errorf("store: truncate torn log tail: %w", err)
		}
	}
	if _, err := f.Seek(rep.LogBytes-rep.TornBytes, io.SeekStart); err != nil {
		f.Close()
		lock.Close()
		return nil, fmt.Errorf("store: open log: %w", err)
	}
	s.log = f
	return s, nil
}

func newMem(dir string) *Embedded {
	return &Embedded{dir: dir, names: map[string]map[string]Record{}, below: map[string]int{}, meta: map[string][]byte{},
		watches: map[*Watcher]struct{}{}, CompactEvery: 10000}
}

// lockDir takes the flock on dir/LOCK: one process per store.
func lockDir(dir string) (*os.File, error) {
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("store: open: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("store: open %s: %w (another btmm-dnsd uses it?)", dir, ErrLocked)
	}
	return lock, nil
}

func decodeOp(o walOp) (Record, error) {
	rr, err := dns.NewRR(o.RR)
	if err != nil || rr == nil {
		return Record{}, fmt.Errorf("record %q does not parse: %v", o.RR, err)
	}
	r := Record{RR: rr, Owner: o.Owner}
	if o.Expires != 0 {
		r.Expires = time.Unix(0, o.Expires)
	}
	return r, nil
}

func encodeOp(put bool, r Record) walOp {
	o := walOp{Put: put, RR: r.RR.String(), Owner: r.Owner}
	if !r.Expires.IsZero() {
		o.Expires = r.Expires.UnixNano()
	}
	return o
}

// readSnapshot reads the snapshot (nil when there is none) and the path it
// came from.
func readSnapshot(dir string) (*snapshot, string, error) {
	path := filepath.Join(dir, snapName)
	data, err := os.ReadFile(path)
	legacy := false
	if errors.Is(err, os.ErrNotExist) {
		path = filepath.Join(dir, legacySnapName)
		data, err = os.ReadFile(path)
		legacy = true
	}
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", nil
	}
	if err != nil {
		return nil, path, fmt.Errorf("store: read snapshot: %w", err)
	}
	payload := data
	if !legacy {
		r := scanFrames(path, data)
		switch {
		case r.damage != nil:
			return nil, path, r.damage
		case len(r.frames) != 1 || r.torn != 0:
			return nil, path, &CorruptError{File: path, Offset: r.end, Reason: "not exactly one intact frame (unreadable snapshot)"}
		}
		payload = r.frames[0].payload
	}
	var snap snapshot
	if err := json.Unmarshal(payload, &snap); err != nil {
		return nil, path, &CorruptError{File: path, Offset: 0, Reason: "unreadable snapshot: " + err.Error()}
	}
	return &snap, path, nil
}

// Report describes a store directory (Check) or what Open found.
type Report struct {
	Dir             string
	Snapshot        string // file name, "" when there is none
	SnapshotRev     uint64
	SnapshotRecords int
	LogRecords      int   // intact log frames (transactions and LLQ state)
	LogBytes        int64 // size of wal.log
	FirstRev        uint64
	LastRev         uint64 // 0 when the log holds no transaction
	TornBytes       int64  // a torn last frame that Open discards
	Records         int    // records after replay
	Rev             uint64
	// Damage is the first damage found (a *CorruptError); the store does
	// not open while it is set. IntactAfter counts the intact frames after
	// it, which Repair salvages.
	Damage      error
	IntactAfter int
}

// load reads the snapshot and the log into memory without changing any
// file. Damage is returned as a *CorruptError; rep.TornBytes tells the
// caller what to cut.
func (s *Embedded) load() (rep Report, err error) {
	rep.Dir = s.dir
	snap, snapPath, err := readSnapshot(s.dir)
	if err != nil {
		return rep, err
	}
	if snap != nil {
		rep.Snapshot = filepath.Base(snapPath)
		rep.SnapshotRev, rep.SnapshotRecords = snap.Rev, len(snap.Records)
		s.rev = snap.Rev
		for i, o := range snap.Records {
			r, err := decodeOp(o)
			if err != nil {
				return rep, &CorruptError{File: snapPath, Offset: 0, Reason: fmt.Sprintf("snapshot record %d: %v", i, err)}
			}
			s.put(r)
		}
		if snap.Meta != nil {
			s.meta = snap.Meta
		}
	}
	logPath := filepath.Join(s.dir, logName)
	data, err := os.ReadFile(logPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return rep, fmt.Errorf("store: read log: %w", err)
	}
	rep.LogBytes = int64(len(data))
	sc := scanFrames(logPath, data)
	rep.TornBytes = sc.torn
	if sc.damage != nil {
		rep.IntactAfter = sc.after
		rep.LogRecords = len(sc.frames)
		return rep, sc.damage
	}
	recs := make([]walRecord, len(sc.frames))
	var prev uint64
	for i, f := range sc.frames {
		if err := json.Unmarshal(f.payload, &recs[i]); err != nil {
			return rep, &CorruptError{File: logPath, Offset: f.off, Reason: "record does not decode: " + err.Error()}
		}
		rev := recs[i].Rev
		if rev == 0 {
			continue
		}
		if prev != 0 && rev != prev+1 {
			return rep, &CorruptError{File: logPath, Offset: f.off,
				Reason: fmt.Sprintf("revision %d follows revision %d (revisions are missing)", rev, prev)}
		}
		if rep.FirstRev == 0 {
			rep.FirstRev = rev
		}
		prev, rep.LastRev = rev, rev
	}
	rep.LogRecords = len(sc.frames)
	// The log continues the snapshot: it starts right after it, or (a crash
	// between writing the snapshot and truncating the log) covers it.
	if rep.LastRev != 0 && snap != nil {
		switch {
		case rep.LastRev < snap.Rev:
			return rep, &CorruptError{File: snapPath, Offset: 0, Reason: fmt.Sprintf(
				"snapshot revision %d is ahead of the log, which ends at revision %d (the log's records would be hidden)",
				snap.Rev, rep.LastRev)}
		case rep.FirstRev > snap.Rev+1:
			return rep, &CorruptError{File: logPath, Offset: sc.frames[0].off, Reason: fmt.Sprintf(
				"the log starts at revision %d but the snapshot ends at %d (revisions are missing)", rep.FirstRev, snap.Rev)}
		}
	}
	for i, rec := range recs {
		if err := s.applyWAL(rec); err != nil {
			return rep, &CorruptError{File: logPath, Offset: sc.frames[i].off, Reason: err.Error()}
		}
		s.logLen++
	}
	rep.Rev = s.rev
	for _, m := range s.names {
		rep.Records += len(m)
	}
	return rep, nil
}

func (s *Embedded) applyWAL(rec walRecord) error {
	if rec.Rev != 0 && rec.Rev <= s.rev {
		s.applyMeta(rec)
		return nil // already in the snapshot
	}
	if err := s.applyRec(rec); err != nil {
		return err
	}
	if rec.Rev != 0 {
		s.rev = rec.Rev
	}
	return nil
}

func (s *Embedded) applyMeta(rec walRecord) {
	for k, v := range rec.Meta {
		if v == nil {
			delete(s.meta, k)
		} else {
			s.meta[k] = v
		}
	}
}

// applyRec applies a log record's meta and ops (not its revision). The ops
// are decoded before any is applied.
func (s *Embedded) applyRec(rec walRecord) error {
	recs := make([]Record, len(rec.Ops))
	for i, o := range rec.Ops {
		r, err := decodeOp(o)
		if err != nil {
			return fmt.Errorf("revision %d: %w", rec.Rev, err)
		}
		recs[i] = r
	}
	s.applyMeta(rec)
	for i, o := range rec.Ops {
		if o.Put {
			s.put(recs[i])
		} else {
			s.del(recs[i].RR)
		}
	}
	return nil
}

func lname(n string) string { return strings.ToLower(dns.CanonicalName(n)) }

// put adds or replaces; it reports whether the RR is new.
func (s *Embedded) put(r Record) (added bool) {
	n := lname(r.RR.Header().Name)
	recs := s.names[n]
	if recs == nil {
		recs = map[string]Record{}
		s.names[n] = recs
		s.countAncestors(n, 1)
	}
	k := r.Key()
	_, existed := recs[k]
	recs[k] = r
	return !existed
}

func (s *Embedded) del(rr dns.RR) (Record, bool) {
	n := lname(rr.Header().Name)
	recs := s.names[n]
	k := RRKey(rr)
	old, ok := recs[k]
	if !ok {
		return Record{}, false
	}
	delete(recs, k)
	if len(recs) == 0 {
		delete(s.names, n)
		s.countAncestors(n, -1)
	}
	return old, true
}

// countAncestors adds d to the descendant count of every proper ancestor of n.
func (s *Embedded) countAncestors(n string, d int) {
	for off, end := dns.NextLabel(n, 0); !end; off, end = dns.NextLabel(n, off) {
		a := n[off:]
		if s.below[a] += d; s.below[a] <= 0 {
			delete(s.below, a)
		}
	}
}

func (s *Embedded) find(rr dns.RR) (Record, bool) {
	r, ok := s.names[lname(rr.Header().Name)][RRKey(rr)]
	return r, ok
}

// sortedRecords returns a name's records in key order (deterministic).
func sortedRecords(m map[string]Record) []Record {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]Record, 0, len(m))
	for _, k := range keys {
		out = append(out, m[k])
	}
	return out
}

type view struct{ s *Embedded }

func (v view) Name(name string) []Record {
	m := v.s.names[lname(name)]
	if len(m) == 0 {
		return nil
	}
	return sortedRecords(m)
}
func (v view) Rev() uint64 { return v.s.rev }
func (v view) HasDescendants(name string) bool {
	return v.s.below[lname(name)] > 0
}

func (s *Embedded) writeLog(rec walRecord, sync bool) error {
	payload, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if _, err := s.log.Write(appendFrame(nil, payload)); err != nil {
		return err
	}
	s.logLen++
	if sync {
		return s.log.Sync()
	}
	return nil
}

// Update implements Store.
func (s *Embedded) Update(ctx context.Context, fn func(View) ([]Op, error)) (uint64, error) {
	s.mu.Lock()
	rev, seq, err := s.updateLocked(ctx, fn)
	s.mu.Unlock()
	if err != nil || seq == 0 {
		return rev, err
	}
	// Group commit: one fsync covers every transaction written before it.
	if err := s.syncUpTo(seq); err != nil {
		return 0, err
	}
	return rev, nil
}

// updateLocked writes the transaction to the log (not yet synced) and to
// memory; it returns the write sequence number to sync up to (0: nothing
// written).
func (s *Embedded) updateLocked(ctx context.Context, fn func(View) ([]Op, error)) (uint64, uint64, error) {
	if s.closed {
		return 0, 0, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return 0, 0, err
	}
	ops, err := fn(view{s})
	if err != nil {
		return 0, 0, err
	}
	// Work out the effective change without touching state.
	var ch Change
	var wops []walOp
	pending := map[string]*Record{} // key -> state after ops so far (nil: absent)
	state := func(rr dns.RR) (*Record, bool) {
		k := RRKey(rr)
		if p, ok := pending[k]; ok {
			return p, p != nil
		}
		r, ok := s.find(rr)
		if !ok {
			return nil, false
		}
		return &r, true
	}
	for _, op := range ops {
		if op.Record.RR == nil {
			return 0, 0, fmt.Errorf("store: update: op without RR")
		}
		k := op.Record.Key()
		switch op.Kind {
		case Put:
			r := op.Record
			r.RR = dns.Copy(r.RR)
			pending[k] = &r
			wops = append(wops, encodeOp(true, r))
		case Delete:
			if _, ok := state(op.Record.RR); !ok {
				continue
			}
			pending[k] = nil
			wops = append(wops, encodeOp(false, op.Record))
		default:
			return 0, 0, fmt.Errorf("store: update: bad op kind %d", op.Kind)
		}
	}
	// Classify against the committed state.
	keys := make([]string, 0, len(pending))
	for k := range pending {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		p := pending[k]
		var probe dns.RR
		if p != nil {
			probe = p.RR
		} else {
			// find the deleted RR among ops
			for _, op := range ops {
				if op.Record.Key() == k {
					probe = op.Record.RR
					break
				}
			}
		}
		old, existed := s.find(probe)
		switch {
		case p == nil && existed:
			ch.Removed = append(ch.Removed, old)
		case p != nil && !existed:
			ch.Added = append(ch.Added, *p)
		case p != nil && existed:
			if old.RR.Header().Ttl != p.RR.Header().Ttl || !old.Expires.Equal(p.Expires) || old.Owner != p.Owner {
				ch.Refreshed = append(ch.Refreshed, *p)
			}
		}
	}
	if len(ch.Added)+len(ch.Removed)+len(ch.Refreshed) == 0 {
		return s.rev, 0, nil
	}
	ch.Rev = s.rev + 1
	if err := s.writeLog(walRecord{Rev: ch.Rev, Ops: wops}, false); err != nil {
		// The log may now hold a partial record; refuse further writes
		// rather than acknowledge anything on top of it.
		s.closed = true
		return 0, 0, fmt.Errorf("store: update: write log: %w", err)
	}
	for _, r := range ch.Removed {
		s.del(r.RR)
	}
	for _, r := range ch.Added {
		s.put(r)
	}
	for _, r := range ch.Refreshed {
		s.put(r)
	}
	s.rev = ch.Rev
	s.writeSeq++
	// Watchers see the change only once it is durable (syncUpTo).
	s.unsynced = append(s.unsynced, ch)
	return ch.Rev, s.writeSeq, nil
}

// syncUpTo makes the log durable at least up to write sequence seq, then
// delivers the changes it made durable to watchers, in order.
func (s *Embedded) syncUpTo(seq uint64) error {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	s.mu.Lock()
	if s.syncedSeq >= seq {
		s.mu.Unlock()
		return nil
	}
	if s.closed || s.log == nil {
		s.mu.Unlock()
		return ErrClosed
	}
	target, f := s.writeSeq, s.log
	s.mu.Unlock()
	began := time.Now()
	err := f.Sync() // writers may append meanwhile; they sync again
	if s.onSync != nil {
		s.onSync(time.Since(began))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.closed = true
		return fmt.Errorf("store: update: sync log: %w", err)
	}
	n := int(target - s.syncedSeq)
	for _, ch := range s.unsynced[:n] {
		s.notify(ch)
	}
	s.unsynced = s.unsynced[n:]
	s.syncedSeq = target
	if s.logLen >= s.CompactEvery {
		_ = s.compact() // the updates are durable already; compaction retries next time
	}
	return nil
}

func (s *Embedded) notify(ch Change) {
	for w := range s.watches {
		w.Push(ch)
	}
}

// Read implements Store.
func (s *Embedded) Read(fn func(View)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(view{s})
}

// All implements Store.
func (s *Embedded) All() ([]Record, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.allLocked(), s.rev
}

func (s *Embedded) allLocked() []Record {
	var out []Record
	names := make([]string, 0, len(s.names))
	for n := range s.names {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		out = append(out, sortedRecords(s.names[n])...)
	}
	return out
}

// Watch implements Store.
func (s *Embedded) Watch(ctx context.Context) (<-chan Change, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := NewWatcher(ctx)
	s.watches[w] = struct{}{}
	go func() {
		<-ctx.Done()
		s.mu.Lock()
		delete(s.watches, w)
		s.mu.Unlock()
		w.Stop()
	}()
	return w.C(), s.rev
}

// PutMeta implements Store.
func (s *Embedded) PutMeta(key string, value []byte) error {
	if value == nil {
		value = []byte{}
	}
	return s.metaWrite(key, value)
}

// DeleteMeta implements Store.
func (s *Embedded) DeleteMeta(key string) error { return s.metaWrite(key, nil) }

func (s *Embedded) metaWrite(key string, value []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if value == nil {
		if _, ok := s.meta[key]; !ok {
			return nil
		}
	}
	if err := s.writeLog(walRecord{Meta: map[string][]byte{key: value}}, false); err != nil {
		s.closed = true
		return fmt.Errorf("store: write meta: %w", err)
	}
	if value == nil {
		delete(s.meta, key)
	} else {
		s.meta[key] = bytes.Clone(value)
	}
	if s.logLen >= s.CompactEvery {
		_ = s.compact()
	}
	return nil
}

// Meta implements Store.
func (s *Embedded) Meta(prefix string) (map[string][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string][]byte{}
	for k, v := range s.meta {
		if strings.HasPrefix(k, prefix) {
			out[k] = bytes.Clone(v)
		}
	}
	return out, nil
}

// Sync implements Store.
func (s *Embedded) Sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return s.log.Sync()
}

// Compact writes a snapshot and truncates the log.
func (s *Embedded) Compact() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return s.compact()
}

func (s *Embedded) compact() error {
	if err := writeSnapshot(s.dir, s.snapshotLocked()); err != nil {
		return fmt.Errorf("store: compact: %w", err)
	}
	// The snapshot now covers everything in the log; replaying the log over
	// it is harmless (revisions are skipped, meta re-applied in order), so a
	// crash before the truncation below loses nothing.
	if err := s.log.Truncate(0); err != nil {
		return fmt.Errorf("store: compact: truncate log: %w", err)
	}
	if _, err := s.log.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("store: compact: %w", err)
	}
	s.logLen = 0
	return s.log.Sync()
}

// Close implements Store.
func (s *Embedded) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.log == nil {
		return nil
	}
	s.closed = true
	err := s.log.Sync()
	if cerr := s.log.Close(); err == nil {
		err = cerr
	}
	s.log = nil
	s.lock.Close() // releases the flock
	for w := range s.watches {
		delete(s.watches, w)
		w.Stop()
	}
	return err
}

var _ Store = (*Embedded)(nil)

func (s *Embedded) snapshotLocked() snapshot {
	snap := snapshot{Rev: s.rev, Meta: s.meta}
	for _, r := range s.allLocked() {
		snap.Records = append(snap.Records, encodeOp(true, r))
	}
	return snap
}

// writeSnapshot replaces dir's snapshot atomically (write, fsync, rename,
// fsync the directory) and removes a legacy unframed one.
func writeSnapshot(dir string, snap snapshot) error {
	data, err := json.Marshal(snap)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, snapName+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(appendFrame(nil, data)); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, snapName)); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, legacySnapName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
