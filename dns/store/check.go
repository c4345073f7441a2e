package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Check reports the state of the embedded store in dir without changing
// anything: what the snapshot and the log hold, a torn tail that Open would
// discard, and the first damage (Report.Damage) that makes Open refuse. It
// fails with ErrLocked while a server uses the directory.
func Check(dir string) (Report, error) {
	if _, err := os.Stat(dir); err != nil {
		return Report{Dir: dir}, fmt.Errorf("store: check: %w", err)
	}
	lock, err := lockDir(dir)
	if err != nil {
		return Report{Dir: dir}, err
	}
	defer lock.Close()
	s := newMem(dir)
	rep, err := s.load()
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			return rep, err
		}
		rep.Damage = err
	}
	return rep, nil
}

// String is the report as `btmm-dnsd check` prints it.
func (r Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "store %s\n", r.Dir)
	if r.Snapshot != "" {
		fmt.Fprintf(&b, "  snapshot %s: revision %d, %d records\n", r.Snapshot, r.SnapshotRev, r.SnapshotRecords)
	} else {
		fmt.Fprintf(&b, "  snapshot: none\n")
	}
	fmt.Fprintf(&b, "  log %s: %d bytes, %d intact records", logName, r.LogBytes, r.LogRecords)
	if r.LastRev != 0 {
		fmt.Fprintf(&b, " (revisions %d-%d)", r.FirstRev, r.LastRev)
	}
	b.WriteString("\n")
	if r.TornBytes > 0 {
		fmt.Fprintf(&b, "  torn last record: %d bytes at offset %d (an incomplete write; discarded at start)\n",
			r.TornBytes, r.LogBytes-r.TornBytes)
	}
	if r.Damage != nil {
		fmt.Fprintf(&b, "  DAMAGED: %v\n", r.Damage)
		fmt.Fprintf(&b, "  %d intact log records after the damage; btmm-dnsd will not start.\n", r.IntactAfter)
		b.WriteString("  `btmm-dnsd repair` keeps a copy of the files and salvages every intact record.\n")
	} else {
		fmt.Fprintf(&b, "  ok: %d records at revision %d\n", r.Records, r.Rev)
	}
	return b.String()
}

// RepairReport says what Repair did.
type RepairReport struct {
	Backup        string // directory holding the damaged files as they were
	SnapshotLost  bool   // the snapshot was unreadable: its records are gone
	Salvaged      int    // intact log records kept
	DroppedBytes  int64  // damaged log bytes skipped
	DroppedFrames int    // intact-looking frames that did not decode
	// MissingRevs are the transactions known lost: revisions absent between
	// the salvaged ones.
	MissingRevs uint64
	Records     int // records in the repaired store
	Rev         uint64
}

func (r RepairReport) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "damaged files kept in %s\n", r.Backup)
	if r.SnapshotLost {
		b.WriteString("snapshot unreadable: its records are lost\n")
	}
	fmt.Fprintf(&b, "salvaged %d intact log records; dropped %d damaged bytes", r.Salvaged, r.DroppedBytes)
	if r.DroppedFrames > 0 {
		fmt.Fprintf(&b, " and %d undecodable records", r.DroppedFrames)
	}
	fmt.Fprintf(&b, " (%d transactions lost)\n", r.MissingRevs)
	fmt.Fprintf(&b, "store now holds %d records at revision %d\n", r.Records, r.Rev)
	return b.String()
}

// Repair is the operator's explicit repair of a damaged store in dir: it
// moves the snapshot and the log into a new directory dir/damaged-<time>/
// (nothing is deleted), salvages every intact record from them (resyncing
// over damaged bytes), and writes a fresh snapshot and an empty log. It
// fails with ErrLocked while a server uses the directory. A healthy store
// is left alone.
func Repair(dir string, now time.Time) (RepairReport, error) {
	var rr RepairReport
	lock, err := lockDir(dir)
	if err != nil {
		return rr, err
	}
	defer lock.Close()
	if _, err := newMem(dir).load(); err == nil {
		return rr, fmt.Errorf("store: repair %s: nothing to repair (use check)", dir)
	} else if !errors.Is(err, ErrCorrupt) {
		return rr, fmt.Errorf("store: repair: %w", err)
	}

	s := newMem(dir)
	snap, _, err := readSnapshot(dir)
	switch {
	case errors.Is(err, ErrCorrupt):
		rr.SnapshotLost = true
	case err != nil:
		return rr, fmt.Errorf("store: repair: %w", err)
	case snap != nil:
		s.rev = snap.Rev
		for _, o := range snap.Records {
			if r, err := decodeOp(o); err == nil {
				s.put(r)
			} else {
				rr.DroppedFrames++
			}
		}
		if snap.Meta != nil {
			s.meta = snap.Meta
		}
	}
	data, err := os.ReadFile(filepath.Join(dir, logName))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return rr, fmt.Errorf("store: repair: %w", err)
	}
	frames, dropped := intactFrom(data, 0)
	rr.DroppedBytes = dropped
	var recs []walRecord
	var maxRev uint64
	for _, f := range frames {
		var rec walRecord
		if json.Unmarshal(f.payload, &rec) != nil {
			rr.DroppedFrames++
			continue
		}
		recs = append(recs, rec)
		maxRev = max(maxRev, rec.Rev)
	}
	// Normally records up to the snapshot's revision are already in it. A
	// snapshot that claims a revision beyond the whole log is the damage
	// itself: the log is newer than it, so all of the log is replayed.
	base := s.rev
	if maxRev != 0 && maxRev < base {
		base = 0
	}
	prev := base
	// Without a trustworthy snapshot the revision before the log is unknown.
	startKnown := !rr.SnapshotLost && base == s.rev
	for _, rec := range recs {
		if rec.Rev != 0 && rec.Rev <= base {
			s.applyMeta(rec)
			prev = rec.Rev
			continue
		}
		if rec.Rev != 0 && (prev != 0 || startKnown) && rec.Rev > prev+1 {
			rr.MissingRevs += rec.Rev - prev - 1
		}
		if err := s.applyRec(rec); err != nil {
			rr.DroppedFrames++
		} else {
			rr.Salvaged++
		}
		if rec.Rev != 0 {
			s.rev = max(s.rev, rec.Rev)
			prev = rec.Rev
		}
	}

	rr.Backup = filepath.Join(dir, "damaged-"+now.UTC().Format("20060102T150405Z"))
	if err := os.Mkdir(rr.Backup, 0o700); err != nil {
		return rr, fmt.Errorf("store: repair: keep a copy: %w", err)
	}
	for _, n := range []string{snapName, legacySnapName, logName} {
		err := os.Rename(filepath.Join(dir, n), filepath.Join(rr.Backup, n))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return rr, fmt.Errorf("store: repair: keep a copy: %w", err)
		}
	}
	if err := writeSnapshot(dir, s.snapshotLocked()); err != nil {
		return rr, fmt.Errorf("store: repair: write snapshot: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, logName), nil, 0o600); err != nil {
		return rr, fmt.Errorf("store: repair: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return rr, fmt.Errorf("store: repair: %w", err)
	}
	rr.Rev = s.rev
	for _, m := range s.names {
		rr.Records += len(m)
	}
	return rr, nil
}
