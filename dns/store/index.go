package store

import (
	"context"

	"github.com/miekg/dns"
)

// Index is an in-memory record index with the lookups a View needs, for
// backends that keep a local copy of their data (the etcd store's cache).
// It is not safe for concurrent use.
type Index struct{ e *Embedded }

// NewIndex returns an empty index.
func NewIndex() *Index { return &Index{newMem("")} }

// Put adds or replaces r; it reports whether r's RR is new.
func (x *Index) Put(r Record) bool { return x.e.put(r) }

// Delete removes rr's record; it returns what was there.
func (x *Index) Delete(rr dns.RR) (Record, bool) { return x.e.del(rr) }

// Find returns rr's record.
func (x *Index) Find(rr dns.RR) (Record, bool) { return x.e.find(rr) }

// Name returns the records of name in key order.
func (x *Index) Name(name string) []Record { return view{x.e}.Name(name) }

// HasDescendants reports whether a name strictly below name owns records.
func (x *Index) HasDescendants(name string) bool { return view{x.e}.HasDescendants(name) }

// All returns every record, by name then key.
func (x *Index) All() []Record { return x.e.allLocked() }

// Len is the number of records.
func (x *Index) Len() int {
	n := 0
	for _, m := range x.e.names {
		n += len(m)
	}
	return n
}

// Leader is implemented by stores shared by several servers (etcd): Lead
// runs fn while this process is the one elected among them, with a ctx
// that ends when it stops being it; Updates made with that ctx commit only
// while the election holds (it is their fence). Lead returns when ctx ends.
// Single-process stores do not implement it: their server is always the
// leader.
type Leader interface {
	Lead(ctx context.Context, fn func(ctx context.Context)) error
}

// Server is one btmm-dnsd replica as published to the others (discovery
// SRV records list every live replica).
type Server struct {
	Name  string   `json:"name"`  // its server_name
	Addrs []string `json:"addrs"` // its server_addrs
	DNS   uint16   `json:"dns"`   // advertised UDP/TCP port
	TLS   uint16   `json:"tls"`   // advertised DoT port
}

// Registry is implemented by stores shared by several servers: Register
// publishes this server until ctx ends (or the process dies: the entry is
// leased), Servers lists the live ones.
type Registry interface {
	Register(ctx context.Context, self Server) error
	Servers() []Server
}
