// Package store holds the rendezvous zone's dynamic data for btmm-dnsd: the
// resource records added by RFC 2136 updates, each with its RFC 9664 lease
// expiry, plus small opaque metadata (persisted LLQs, RFC 8764).
//
// [Store] is deliberately small so that a distributed backend (etcd) can
// implement it later: Update runs a pure function against a consistent view
// and commits its operations atomically (optimistic transactions may re-run
// it), and Watch delivers every committed change in revision order. LLQ
// events are driven from Watch, never from the update handler, so a change
// committed by another replica produces the same events.
//
// [Open] returns the embedded default store: in memory, made durable by a
// write-ahead log that is fsynced before Update returns, with periodic
// snapshots (compaction). Every log record and the snapshot carry a CRC-32C.
// A torn final log record (a crash mid-write) is discarded at open with a
// warning naming its offset and size; it was never acknowledged. Any other
// damage makes Open fail with a [*CorruptError] naming the file and offset,
// changing nothing on disk; [Check] reports a store's state and [Repair]
// (an operator's explicit action) keeps a copy of the damaged files and
// salvages every intact record.
package store

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Errors.
var (
	ErrClosed  = errors.New("store: closed")
	ErrCorrupt = errors.New("store: corrupt data")
	ErrLocked  = errors.New("store: locked by another process")
)

// Record is one stored resource record. Expires is the wall-clock end of its
// update lease (zero: no lease). Owner names the TSIG key that last wrote it.
type Record struct {
	RR      dns.RR
	Expires time.Time
	Owner   string
}

// Key returns the identity of the record's RR in the RFC 2136 sense: owner
// name (case-insensitive), class, type and RDATA; TTL excluded.
func (r Record) Key() string { return RRKey(r.RR) }

// RRKey is Record.Key for a bare RR.
func RRKey(rr dns.RR) string {
	h := rr.Header()
	s := rr.String()
	// RDATA is what follows the header's text.
	hdr := h.String()
	rdata := strings.TrimPrefix(s, hdr)
	if dns.Type(h.Rrtype) != dns.Type(dns.TypeTXT) {
		rdata = strings.ToLower(rdata)
	}
	return strings.ToLower(dns.CanonicalName(h.Name)) + "\x00" + dns.Class(h.Class).String() + "\x00" +
		dns.Type(h.Rrtype).String() + "\x00" + rdata
}

// OpKind says what an Op does.
type OpKind int

// Op kinds.
const (
	// Put adds the record or, when an identical RR exists, replaces its TTL,
	// lease and owner (an RFC 9664 lease refresh).
	Put OpKind = iota + 1
	// Delete removes the identical RR if present.
	Delete
)

// Op is one operation of a transaction.
type Op struct {
	Kind   OpKind
	Record Record
}

// View is a consistent read-only view of the store during Update.
type View interface {
	// Name returns copies of all records owned by name (case-insensitive).
	Name(name string) []Record
	// HasDescendants reports whether any name strictly below name owns
	// records (name is then an empty non-terminal if it owns none itself).
	HasDescendants(name string) bool
	// Rev is the revision the view reflects.
	Rev() uint64
}

// Change is one committed transaction as seen by watchers. Added holds RRs
// that did not exist before, Removed RRs that no longer exist, Refreshed RRs
// whose TTL, lease or owner changed. A transaction that changed nothing is not
// delivered.
type Change struct {
	Rev       uint64
	Added     []Record
	Removed   []Record
	Refreshed []Record
}

// Store is the zone data store. All methods are safe for concurrent use.
type Store interface {
	// Update calls fn with a consistent view and atomically commits the ops
	// it returns; when fn returns an error nothing is committed and that
	// error is returned. fn must be pure: a backend may call it more than
	// once. On success the change is durable and its revision is returned.
	Update(ctx context.Context, fn func(View) ([]Op, error)) (uint64, error)
	// Read calls fn with a consistent view.
	Read(fn func(View))
	// All returns every record and the revision.
	All() ([]Record, uint64)
	// Watch delivers every change committed after the returned revision, in
	// order, until ctx ends. A slow watcher blocks committers, so watchers
	// must drain promptly.
	Watch(ctx context.Context) (<-chan Change, uint64)
	// PutMeta / DeleteMeta / Meta keep small opaque values (LLQ state). They
	// do not produce Changes. Meta writes are durable with the next fsync
	// (the next Update or Sync), not necessarily on return.
	PutMeta(key string, value []byte) error
	DeleteMeta(key string) error
	Meta(prefix string) (map[string][]byte, error)
	// Sync makes all previous writes durable.
	Sync() error
	Close() error
}
