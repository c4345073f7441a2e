package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// damagedStore makes a store with a snapshot of 10 records (revisions 1-10)
// and a log of 20 more transactions (11-30), one record each, and returns
// its directory and the log's frame offsets.
func damagedStore(t *testing.T) (string, []int64) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	put := func(i int) {
		r := rec(t, fmt.Sprintf("h%d.alice.btmm.example. 60 IN A 192.0.2.%d", i, i))
		if _, err := s.Update(context.Background(), func(View) ([]Op, error) { return []Op{{Kind: Put, Record: r}}, nil }); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		put(i)
	}
	if err := s.Compact(); err != nil {
		t.Fatal(err)
	}
	for i := 10; i < 30; i++ {
		put(i)
	}
	s.Close()
	data, _ := os.ReadFile(filepath.Join(dir, logName))
	sc := scanFrames("", data)
	if sc.damage != nil || sc.torn != 0 || len(sc.frames) != 20 {
		t.Fatalf("fresh log: %+v", sc)
	}
	var offs []int64
	for _, f := range sc.frames {
		offs = append(offs, f.off)
	}
	return dir, offs
}

// files returns the contents of every file in dir but LOCK.
func files(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.IsDir() || e.Name() == "LOCK" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

func editFile(t *testing.T, path string, f func([]byte) []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, f(b), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestCorruption is the damage table of issue 16: a torn tail is discarded
// with a warning naming the bytes; anything else refuses to open, naming
// file and offset, with every file unchanged; Check reports the same;
// Repair keeps a copy and salvages every intact record.
func TestCorruption(t *testing.T) {
	log := func(d string) string { return filepath.Join(d, logName) }
	snapf := func(d string) string { return filepath.Join(d, snapName) }
	for _, tc := range []struct {
		name string
		// damage edits the store; it returns the damaged file and offset
		// Open must name (file "" means: opens with a torn-tail warning).
		damage func(t *testing.T, dir string, offs []int64) (file string, off int64)
		// records the store holds afterwards (Open for a torn tail, else
		// Repair); lost: transactions Repair reports lost.
		records int
		lost    uint64
	}{
		{"bit flip in a record", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte { b[o[5]+20] ^= 0x04; return b })
			return log(d), o[5]
		}, 29, 1},
		{"bit flip in a length", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte { b[o[7]+3] ^= 0x01; return b })
			return log(d), o[7]
		}, 29, 1},
		{"zeroed 512-byte block", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte { clear(b[o[4]+10 : o[4]+522]); return b })
			return log(d), o[4]
		}, -1, 0},
		{"truncated middle", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte { return append(b[:o[9]+30:o[9]+30], b[o[11]+30:]...) })
			return log(d), o[9]
		}, 27, 3},
		{"garbage tail", func(t *testing.T, d string, o []int64) (string, int64) {
			var end int64
			editFile(t, log(d), func(b []byte) []byte {
				end = int64(len(b))
				return append(b, "this is not a log record, it is garbage appended by someone\n"...)
			})
			return log(d), end
		}, 30, 0},
		{"torn tail", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte { return b[:o[19]+20] })
			return "", o[19]
		}, 29, 0},
		{"torn tail, header only", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte { return b[:o[19]+5] })
			return "", o[19]
		}, 29, 0},
		{"torn tail, zero-filled", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte {
				b = append(b, make([]byte, 1024)...) // a zeroed sector beyond the data
				last := o[19]
				binary.BigEndian.PutUint32(b[last:], uint32(len(b)-int(last)-8))
				return b
			})
			return "", o[19]
		}, 29, 0},
		{"future snapshot", func(t *testing.T, d string, o []int64) (string, int64) {
			rewriteSnapshot(t, d, func(s *snapshot) { s.Rev += 1000 })
			return snapf(d), 0
		}, 30, 0},
		{"unreadable snapshot", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, snapf(d), func(b []byte) []byte { b[40] ^= 0x20; return b })
			return snapf(d), 0
		}, 20, 0},
		{"log gap after the snapshot", func(t *testing.T, d string, o []int64) (string, int64) {
			editFile(t, log(d), func(b []byte) []byte { return b[o[2]:] })
			return log(d), 0
		}, 28, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, offs := damagedStore(t)
			file, off := tc.damage(t, dir, offs)
			if tc.records < 0 { // the zeroed block: frame 4 and the ones it reaches
				tc.lost = 1 + countFrames(offs, 4, 512)
				tc.records = 30 - int(tc.lost)
			}
			before := files(t, dir)
			var logBuf bytes.Buffer
			s, err := OpenOptions(dir, Options{Log: slog.New(slog.NewTextHandler(&logBuf, nil))})
			if file == "" { // torn tail: opens, warns with offset and size
				if err != nil {
					t.Fatalf("torn tail refused: %v", err)
				}
				defer s.Close()
				if all, _ := s.All(); len(all) != tc.records {
					t.Fatalf("%d records after torn tail, want %d", len(all), tc.records)
				}
				size := int64(len(before[logName])) - off
				w := logBuf.String()
				if !strings.Contains(w, "level=WARN") || !strings.Contains(w, fmt.Sprintf("offset=%d bytes=%d", off, size)) {
					t.Fatalf("warning does not name the bytes (offset %d, %d bytes): %q", off, size, w)
				}
				if fi, _ := os.Stat(log(dir)); fi.Size() != off {
					t.Fatalf("log not cut to %d: %d", off, fi.Size())
				}
				return
			}
			if err == nil {
				s.Close()
				t.Fatal("damaged store opened")
			}
			var ce *CorruptError
			if !errors.As(err, &ce) || !errors.Is(err, ErrCorrupt) || ce.File != file || ce.Offset != off {
				t.Fatalf("error %v, want damage in %s at offset %d", err, file, off)
			}
			if !strings.Contains(err.Error(), file) || !strings.Contains(err.Error(), fmt.Sprintf("offset %d", off)) {
				t.Fatalf("message does not name file and offset: %v", err)
			}
			if after := files(t, dir); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatal("a refused open changed files")
			}
			rep, err := Check(dir)
			if err != nil || rep.Damage == nil || !strings.Contains(rep.String(), "DAMAGED") {
				t.Fatalf("check: %v\n%s", err, rep)
			}
			if after := files(t, dir); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatal("check changed files")
			}
			rr, err := Repair(dir, time.Unix(1800000000, 0))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("repair: %s", rr)
			if rr.Records != tc.records || rr.MissingRevs != tc.lost {
				t.Fatalf("repair kept %d records (want %d), %d lost (want %d)", rr.Records, tc.records, rr.MissingRevs, tc.lost)
			}
			// The copy holds the damaged files byte for byte.
			for n, b := range before {
				got, err := os.ReadFile(filepath.Join(rr.Backup, n))
				if err != nil || string(got) != b {
					t.Fatalf("backup of %s: %v", n, err)
				}
			}
			s, err = Open(dir)
			if err != nil {
				t.Fatalf("open after repair: %v", err)
			}
			defer s.Close()
			if all, _ := s.All(); len(all) != tc.records {
				t.Fatalf("%d records after repair", len(all))
			}
			if _, err := Repair(dir, time.Now()); err == nil {
				t.Fatal("repair of a healthy store did something")
			}
		})
	}
}

// countFrames returns how many frames other than frame i a zeroed block of
// n bytes starting 10 bytes into frame i destroys.
func countFrames(offs []int64, i int, n int64) uint64 {
	end := offs[i] + 10 + n
	var c uint64
	for j := i + 1; j < len(offs); j++ {
		if offs[j] < end {
			c++
		}
	}
	return c
}

func rewriteSnapshot(t *testing.T, dir string, f func(*snapshot)) {
	t.Helper()
	snap, _, err := readSnapshot(dir)
	if err != nil || snap == nil {
		t.Fatalf("read snapshot: %v", err)
	}
	f(snap)
	data, _ := json.Marshal(snap)
	if err := os.WriteFile(filepath.Join(dir, snapName), appendFrame(nil, data), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestCheckHealthyAndLocked(t *testing.T) {
	dir, _ := damagedStore(t)
	rep, err := Check(dir)
	if err != nil || rep.Damage != nil || rep.Records != 30 || rep.Rev != 30 || rep.FirstRev != 11 {
		t.Fatalf("%v %+v", err, rep)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := Check(dir); !errors.Is(err, ErrLocked) {
		t.Fatalf("check of a store in use: %v", err)
	}
	if _, err := Repair(dir, time.Now()); !errors.Is(err, ErrLocked) {
		t.Fatalf("repair of a store in use: %v", err)
	}
}

// A crash between writing the snapshot and truncating the log leaves a log
// that the snapshot covers: not damage.
func TestSnapshotCoversLog(t *testing.T) {
	dir, _ := damagedStore(t)
	s, _ := Open(dir)
	logData, _ := os.ReadFile(filepath.Join(dir, logName))
	s.Compact()
	s.Close()
	os.WriteFile(filepath.Join(dir, logName), logData, 0o600)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if all, rev := s.All(); len(all) != 30 || rev != 30 {
		t.Fatalf("%d records rev %d", len(all), rev)
	}
}

// An unframed snapshot.json of earlier versions is read and replaced by the
// framed snapshot at the next compaction.
func TestLegacySnapshot(t *testing.T) {
	dir, _ := damagedStore(t)
	snap, _, _ := readSnapshot(dir)
	data, _ := json.Marshal(snap)
	os.WriteFile(filepath.Join(dir, legacySnapName), data, 0o600)
	os.Remove(filepath.Join(dir, snapName))
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if all, _ := s.All(); len(all) != 30 {
		t.Fatalf("%d records", len(all))
	}
	s.Compact()
	s.Close()
	if _, err := os.Stat(filepath.Join(dir, legacySnapName)); !os.IsNotExist(err) {
		t.Fatalf("legacy snapshot left: %v", err)
	}
}

func FuzzScanFrames(f *testing.F) {
	f.Add(appendFrame(appendFrame(nil, []byte(`{"rev":1}`)), []byte(`{"rev":2}`)))
	f.Add([]byte{0, 0, 0, 9, 1, 2, 3, 4, '{'})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := scanFrames("f", data)
		// Intact frames re-frame to exactly the scanned prefix.
		var re []byte
		for _, fr := range r.frames {
			re = appendFrame(re, fr.payload)
		}
		if !bytes.Equal(re, data[:r.end]) {
			t.Fatal("intact frames do not re-frame to the prefix")
		}
		if r.damage == nil && r.end+r.torn != int64(len(data)) {
			t.Fatalf("undamaged scan covers %d+%d of %d bytes", r.end, r.torn, len(data))
		}
		if r.damage != nil && r.torn != 0 {
			t.Fatal("both damaged and torn")
		}
	})
}
