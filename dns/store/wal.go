package store

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// The write-ahead log and the snapshot are sequences of frames:
//
//	4-byte big-endian payload length | 4-byte CRC-32C of the payload | payload
//
// A payload is never empty and never longer than maxFrame. Each frame is
// written with one write(2), so a crash leaves at most the last frame
// incomplete: its header cut short, its payload cut short, or (after a power
// loss on some file systems) its tail zero-filled. Such a torn final frame
// was never acknowledged (an UPDATE is answered only after fsync) and is
// discarded with a warning. Anything else that does not decode — a CRC
// mismatch, a bad length, an invalid frame with more data after it — is
// corruption: Open refuses to start and names the file and offset, and only
// Repair (an operator's explicit action) changes the files.

// maxFrame bounds a frame's payload. Transactions are small (an UPDATE has
// at most a few hundred records); snapshots are single frames too.
const maxFrame = 1 << 30

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// CorruptError is damage found in a store file. It wraps ErrCorrupt.
type CorruptError struct {
	File   string // path of the damaged file
	Offset int64  // byte offset of the damage
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("store: %s is damaged at offset %d: %s", e.File, e.Offset, e.Reason)
}

// Unwrap makes errors.Is(err, ErrCorrupt) true.
func (e *CorruptError) Unwrap() error { return ErrCorrupt }

func appendFrame(dst, payload []byte) []byte {
	var hdr [8]byte
	binary.BigEndian.PutUint32(hdr[:4], uint32(len(payload)))
	binary.BigEndian.PutUint32(hdr[4:], crc32.Checksum(payload, crcTable))
	return append(append(dst, hdr[:]...), payload...)
}

// frame is one intact frame of a file.
type frame struct {
	off     int64
	payload []byte
}

// scanResult is what scanFrames found in a file.
type scanResult struct {
	frames []frame // intact frames up to the first damage
	end    int64   // offset just after the last intact frame
	torn   int64   // length of a torn final frame at end (0: none)
	damage error   // *CorruptError at the first damage (nil: none)
	after  int     // intact frames found after the damage
}

// frameAt reports whether an intact frame starts at off, and its length.
func frameAt(data []byte, off int) (int, bool) {
	if len(data)-off < 8 {
		return 0, false
	}
	n := int(binary.BigEndian.Uint32(data[off:]))
	if n == 0 || n > maxFrame || n > len(data)-off-8 {
		return 0, false
	}
	payload := data[off+8 : off+8+n]
	return n, crc32.Checksum(payload, crcTable) == binary.BigEndian.Uint32(data[off+4:])
}

// intactFrom counts the intact frames found at or after off, resynchronising
// byte by byte over damage (what Repair salvages).
func intactFrom(data []byte, off int) (frames []frame, damaged int64) {
	for off < len(data) {
		if n, ok := frameAt(data, off); ok {
			frames = append(frames, frame{int64(off), data[off+8 : off+8+n]})
			off += 8 + n
			continue
		}
		off++
		damaged++
	}
	return frames, damaged
}

func allZero(b []byte) bool { return len(bytes.TrimLeft(b, "\x00")) == 0 }

// scanFrames reads data (the whole file) frame by frame; file names it in
// errors.
func scanFrames(file string, data []byte) scanResult {
	var r scanResult
	off := 0
	corrupt := func(format string, args ...any) scanResult {
		r.damage = &CorruptError{File: file, Offset: int64(off), Reason: fmt.Sprintf(format, args...)}
		fs, _ := intactFrom(data, off+1)
		r.after = len(fs)
		return r
	}
	torn := func() scanResult {
		r.torn = int64(len(data) - off)
		return r
	}
	for off < len(data) {
		rest := data[off:]
		if len(rest) < 8 {
			return torn() // the header was cut short
		}
		n := int(binary.BigEndian.Uint32(rest))
		if n == 0 || n > maxFrame {
			if allZero(rest) {
				return torn() // zero-filled after a power loss
			}
			return corrupt("invalid frame length %d", n)
		}
		if n > len(rest)-8 {
			// Cut short. A crash mid-write leaves this only as the very
			// last thing in the file, and what is there is the start of our
			// JSON (or zeros).
			partial := rest[8:]
			if fs, _ := intactFrom(data, off+1); len(fs) > 0 {
				return corrupt("frame length %d runs past the end of the file, but intact frames follow", n)
			}
			if len(partial) == 0 || partial[0] == '{' || allZero(partial) {
				return torn()
			}
			return corrupt("frame length %d runs past the end of the file and its data is not a record", n)
		}
		payload := rest[8 : 8+n]
		if crc32.Checksum(payload, crcTable) != binary.BigEndian.Uint32(rest[4:]) {
			// A last frame whose tail is zeros is a write that did not
			// reach the disk in full (etcd's torn-entry rule: a zeroed
			// sector at the end).
			last := 8+n == len(rest)
			if last && zeroTailSector(data, off) {
				return torn()
			}
			return corrupt("CRC mismatch in a frame of %d bytes", n)
		}
		r.frames = append(r.frames, frame{int64(off), payload})
		off += 8 + n
		r.end = int64(off)
	}
	return r
}

// zeroTailSector reports whether the frame at off (the last one) ends in a
// 512-byte-aligned run of zeros that reaches the end of the file.
func zeroTailSector(data []byte, off int) bool {
	const sector = 512
	start := (len(data) - 1) / sector * sector
	start = max(start, off+8)
	return start < len(data) && allZero(data[start:])
}
