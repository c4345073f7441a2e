package keying

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// replayCache remembers the INITs a responder accepted (Kerberos: client,
// server, authenticator time and sequence number; PSK: the nonce) until they
// are too old to be accepted anyway. With a file it survives a restart: the
// file is rewritten (temporary file, fsync, rename, fsync of the directory)
// before the RESP leaves, so an INIT answered before a crash or a reboot is
// refused after it.
//
// A file that cannot be read or fails its checksum is moved aside
// (<file>.corrupt) and the cache starts "blind": until blindUntil it refuses
// every INIT made before the restart by construction (an INIT whose time,
// by the sender's clock, is earlier than the start plus the allowed skew),
// which costs a genuine initiator at most one retry per peer during the
// skew window after the restart.
type replayCache struct {
	path       string
	entries    map[[32]byte]time.Time // SHA-256 of the key -> until
	start      time.Time
	blindUntil time.Time
	skew       time.Duration
}

var replayMagic = []byte("BTMMRPL1")

// loadReplayCache opens the cache at path ("" keeps it in memory only).
// The returned warning, if any, says why the cache starts blind.
func loadReplayCache(path string, now time.Time, skew time.Duration) (*replayCache, error) {
	c := &replayCache{path: path, entries: map[[32]byte]time.Time{}, start: now, skew: skew}
	if path == "" {
		return c, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err == nil {
		err = c.decode(b)
	}
	if err != nil {
		c.entries = map[[32]byte]time.Time{}
		c.blindUntil = now.Add(2*skew + time.Second)
		if rerr := os.Rename(path, path+".corrupt"); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
		return c, fmt.Errorf("replay cache %s unusable (moved to %s.corrupt); refusing INITs made before this start until %v: %w",
			path, path, c.blindUntil.UTC().Format(time.RFC3339), err)
	}
	c.expire(now)
	return c, nil
}

func (c *replayCache) decode(b []byte) error {
	if len(b) < len(replayMagic)+sha256.Size || !bytes.Equal(b[:len(replayMagic)], replayMagic) {
		return errors.New("not a btmm replay cache")
	}
	body, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if s := sha256.Sum256(body); !bytes.Equal(s[:], sum) {
		return errors.New("checksum mismatch")
	}
	recs := body[len(replayMagic):]
	if len(recs)%40 != 0 {
		return fmt.Errorf("%d bytes of records", len(recs))
	}
	for ; len(recs) > 0; recs = recs[40:] {
		c.entries[[32]byte(recs[:32])] = time.Unix(0, int64(binary.BigEndian.Uint64(recs[32:40])))
	}
	return nil
}

func (c *replayCache) encode() []byte {
	b := append([]byte(nil), replayMagic...)
	for k, until := range c.entries {
		b = append(b, k[:]...)
		b = binary.BigEndian.AppendUint64(b, uint64(until.UnixNano()))
	}
	s := sha256.Sum256(b)
	return append(b, s[:]...)
}

// check refuses an INIT seen before, or, while blind, one made (by its
// sender's clock, sent) before this start.
func (c *replayCache) check(key string, sent, now time.Time) error {
	if until, ok := c.entries[sha256.Sum256([]byte(key))]; ok && now.Before(until) {
		return fmt.Errorf("%w: this INIT was accepted before", ErrReplay)
	}
	if now.Before(c.blindUntil) && sent.Before(c.start.Add(c.skew)) {
		return fmt.Errorf("%w: the replay cache was lost at restart; INITs made before %v are refused until %v",
			ErrReplay, c.start.Add(c.skew).UTC().Format(time.RFC3339), c.blindUntil.UTC().Format(time.RFC3339))
	}
	return nil
}

// add remembers key until then and writes the file.
func (c *replayCache) add(key string, until, now time.Time) error {
	c.expire(now)
	c.entries[sha256.Sum256([]byte(key))] = until
	return c.save()
}

func (c *replayCache) expire(now time.Time) {
	for k, until := range c.entries {
		if !now.Before(until) {
			delete(c.entries, k)
		}
	}
}

func (c *replayCache) save() error {
	if c.path == "" {
		return nil
	}
	dir := filepath.Dir(c.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("replay cache: %w", err)
	}
	f, err := os.CreateTemp(dir, filepath.Base(c.path)+".tmp*")
	if err != nil {
		return fmt.Errorf("replay cache: %w", err)
	}
	_, werr := f.Write(c.encode())
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("replay cache: write %s: %w", f.Name(), err)
	}
	if err := os.Rename(f.Name(), c.path); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("replay cache: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
