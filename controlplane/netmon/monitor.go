package netmon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"
)

// MsgKind is the kind of an rtnetlink notification.
type MsgKind string

// Message kinds (RTM_NEWLINK, RTM_DELLINK, ...), and Resync for "messages
// were lost, read everything again".
const (
	LinkChanged  MsgKind = "link"     // RTM_NEWLINK (new link or changed flags)
	LinkDeleted  MsgKind = "dellink"  // RTM_DELLINK (deleted, or moved to another namespace)
	AddrAdded    MsgKind = "addr"     // RTM_NEWADDR
	AddrDeleted  MsgKind = "deladdr"  // RTM_DELADDR
	RouteAdded   MsgKind = "route"    // RTM_NEWROUTE
	RouteDeleted MsgKind = "delroute" // RTM_DELROUTE
	Resync       MsgKind = "resync"
)

// Msg is one rtnetlink notification, reduced to what the Monitor needs.
type Msg struct {
	Kind  MsgKind `json:"kind"`
	Link  *Link   `json:"link,omitempty"`
	Addr  *Addr   `json:"addr,omitempty"`
	Route *Route  `json:"route,omitempty"`
}

func (m Msg) String() string {
	switch {
	case m.Link != nil:
		return fmt.Sprintf("%s %s(%d) up=%v", m.Kind, m.Link.Name, m.Link.Index, m.Link.Up)
	case m.Addr != nil:
		return fmt.Sprintf("%s %v dev %d", m.Kind, m.Addr.Prefix, m.Addr.Index)
	case m.Route != nil:
		return fmt.Sprintf("%s %v via %v dev %d table %d", m.Kind, m.Route.Dst, m.Route.Gateway, m.Route.Index, m.Route.Table)
	}
	return string(m.Kind)
}

// Source is the kernel side of a Monitor.
type Source interface {
	// Subscribe delivers link, address and route notifications until ctx
	// ends, then closes the channel. A channel closed while ctx is still
	// live means the subscription failed (e.g. the socket overflowed):
	// the Monitor subscribes again and reads a fresh snapshot.
	Subscribe(ctx context.Context) (<-chan Msg, error)
	// Snapshot reads the links, addresses and main-table routes now.
	Snapshot(ctx context.Context) (Snapshot, error)
}

// DefaultDebounce is how long a Monitor collects a burst of notifications
// before it reads the new state.
const DefaultDebounce = 250 * time.Millisecond

// Config configures a Monitor. Zero fields take the defaults noted.
type Config struct {
	// Debounce: after the first notification of a burst, wait this long
	// (collecting the rest) before reading and classifying the new state.
	// Default DefaultDebounce.
	Debounce time.Duration
	// Ignore says which links are not the host's network. Default
	// DefaultIgnore (btmm's own links).
	Ignore IgnoreFunc
	// RetryInterval: wait after a failed subscription or snapshot. Default 1 s.
	RetryInterval time.Duration
	Logger        *slog.Logger // default: discard
}

// Change is a change of the host's network state, after debouncing.
type Change struct {
	Old, New State
	Major    bool     // the tunnels must follow (see the package comment)
	Reasons  []string // human readable
	Msgs     int      // notifications in the burst
	// First is when the burst's first notification arrived; the change
	// was read one Debounce later.
	First time.Time
}

// Monitor follows the host's network. Its methods are safe for concurrent use.
type Monitor struct {
	src Source
	cfg Config
	log *slog.Logger

	ready chan struct{} // closed once the first snapshot is read

	mu     sync.Mutex
	state  State
	byIdx  map[int]string // link names of the last snapshot (for filtering)
	cbs    map[int]func(Change)
	nextCB int
}

// New returns a Monitor reading from src; Run starts it.
func New(src Source, cfg Config) (*Monitor, error) {
	if src == nil {
		return nil, errors.New("netmon: no source")
	}
	if cfg.Debounce < 0 || cfg.RetryInterval < 0 {
		return nil, fmt.Errorf("netmon: negative debounce %v or retry interval %v", cfg.Debounce, cfg.RetryInterval)
	}
	if cfg.Debounce == 0 {
		cfg.Debounce = DefaultDebounce
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = time.Second
	}
	if cfg.Ignore == nil {
		cfg.Ignore = DefaultIgnore
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Monitor{src: src, cfg: cfg, log: cfg.Logger, ready: make(chan struct{}), cbs: map[int]func(Change){}, byIdx: map[int]string{}}, nil
}

// RegisterChangeCallback calls f for every change (Major or not) from the
// Monitor's goroutine, in order; f must not block for long. The returned
// function unregisters it.
func (m *Monitor) RegisterChangeCallback(f func(Change)) (unregister func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := m.nextCB
	m.nextCB++
	m.cbs[id] = f
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.cbs, id)
	}
}

// State returns the last state read.
func (m *Monitor) State() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

// Ready is closed once the first state has been read.
func (m *Monitor) Ready() <-chan struct{} { return m.ready }

// burst is the notifications collected during one debounce window.
type burst struct {
	first  time.Time
	n      int
	flaps  map[int]bool // links seen going down
	resync bool
}

// Run follows the network until ctx ends.
func (m *Monitor) Run(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var b *burst
	first := true
	for ctx.Err() == nil {
		msgs, err := m.src.Subscribe(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			m.log.Warn("netmon: subscribe failed; retrying", "err", err, "in", m.cfg.RetryInterval)
			if !sleep(ctx, m.cfg.RetryInterval) {
				break
			}
			continue
		}
		if first {
			// Subscribed first, then read: nothing falls in between.
			for !m.initial(ctx) {
				if !sleep(ctx, m.cfg.RetryInterval) {
					return nil
				}
			}
			first = false
		} else {
			// What happened while we were not subscribed is unknown.
			if b == nil {
				b = &burst{first: time.Now()}
			}
			b.resync = true
			timer.Reset(0)
		}
	recv:
		for {
			select {
			case <-ctx.Done():
				break recv
			case msg, ok := <-msgs:
				if !ok {
					if ctx.Err() == nil {
						m.log.Warn("netmon: subscription lost; subscribing again")
					}
					break recv
				}
				if !m.interesting(msg) {
					continue
				}
				if b == nil {
					b = &burst{first: time.Now()}
					timer.Reset(m.cfg.Debounce)
				}
				b.n++
				if msg.Kind == Resync {
					b.resync = true
				}
				if msg.Link != nil && (!msg.Link.Up || msg.Kind == LinkDeleted) {
					if b.flaps == nil {
						b.flaps = map[int]bool{}
					}
					b.flaps[msg.Link.Index] = true
				}
			case <-timer.C:
				if b == nil {
					continue
				}
				if m.evaluate(ctx, b) {
					b = nil
				} else {
					timer.Reset(m.cfg.RetryInterval)
				}
			}
		}
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (m *Monitor) initial(ctx context.Context) bool {
	sn, err := m.src.Snapshot(ctx)
	if err != nil {
		m.log.Warn("netmon: reading the network state failed; retrying", "err", err)
		return false
	}
	st := sn.State(m.cfg.Ignore)
	m.mu.Lock()
	m.state = st
	m.setNames(sn)
	m.mu.Unlock()
	m.log.Info("netmon: network", "state", st.String())
	close(m.ready)
	return true
}

func (m *Monitor) setNames(sn Snapshot) {
	clear(m.byIdx)
	for _, l := range sn.Links {
		m.byIdx[l.Index] = l.Name
	}
}

// interesting filters notifications that cannot change the State: our own
// links, loopback, ULA and link-local addresses, routes that are not
// main-table default routes (btmm's /128 routes, connected routes, routes
// in other tables).
func (m *Monitor) interesting(msg Msg) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	ignoredIdx := func(idx int) bool {
		name, ok := m.byIdx[idx]
		return ok && m.cfg.Ignore(name)
	}
	switch {
	case msg.Kind == Resync:
		return true
	case msg.Link != nil:
		if msg.Kind == LinkDeleted {
			delete(m.byIdx, msg.Link.Index)
		} else {
			m.byIdx[msg.Link.Index] = msg.Link.Name
		}
		return !msg.Link.Loopback && !m.cfg.Ignore(msg.Link.Name)
	case msg.Addr != nil:
		return interestingAddr(msg.Addr.Prefix) && !ignoredIdx(msg.Addr.Index)
	case msg.Route != nil:
		r := msg.Route
		return (r.Table == 0 || r.Table == mainTable) && r.Dst.Bits() == 0 && !ignoredIdx(r.Index)
	}
	return false
}

// evaluate reads the state after a burst and reports it; false means the
// read failed and must be retried.
func (m *Monitor) evaluate(ctx context.Context, b *burst) bool {
	sn, err := m.src.Snapshot(ctx)
	if err != nil {
		if ctx.Err() == nil {
			m.log.Warn("netmon: reading the network state failed; retrying", "err", err, "in", m.cfg.RetryInterval)
		}
		return false
	}
	cur := sn.State(m.cfg.Ignore)
	m.mu.Lock()
	old := m.state
	m.state = cur
	m.setNames(sn)
	cbs := make([]func(Change), 0, len(m.cbs))
	for i := 0; i < m.nextCB; i++ {
		if f, ok := m.cbs[i]; ok {
			cbs = append(cbs, f)
		}
	}
	m.mu.Unlock()
	major, reasons := Classify(old, cur)
	if !major && cur.Default4.Valid() && (b.flaps[cur.Default4.Index] || old.carrierLost(cur, cur.Default4.Index)) {
		// Down and up again within the window: the state looks the
		// same, but the path behind the link may not be (another
		// access point, a NAT that lost its mappings).
		major = true
		reasons = append(reasons, fmt.Sprintf("default route's link %s went down and up", cur.Default4.Device))
	}
	if !major && b.resync && !old.Equal(cur) {
		reasons = append(reasons, "state read again after lost notifications")
	}
	if !major && old.Equal(cur) {
		m.log.Debug("netmon: no change", "notifications", b.n)
		return true
	}
	ch := Change{Old: old, New: cur, Major: major, Reasons: reasons, Msgs: b.n, First: b.first}
	if major {
		m.log.Info("netmon: major network change", "reasons", reasons, "state", cur.String(), "notifications", b.n)
	} else {
		m.log.Debug("netmon: minor network change", "reasons", reasons, "notifications", b.n)
	}
	for _, f := range cbs {
		f(ch)
	}
	return true
}

// Fake is a Source for tests: Publish replaces the snapshot the kernel
// "has" and delivers notifications. The zero value is ready to use.
type Fake struct {
	mu    sync.Mutex
	snap  Snapshot
	subs  map[chan Msg]struct{}
	err   error
	reads int
}

// Snapshots counts Snapshot calls.
func (f *Fake) Snapshots() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reads
}

// Drop ends every current subscription, as a socket overflow would.
func (f *Fake) Drop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for ch := range f.subs {
		delete(f.subs, ch)
		close(ch)
	}
}

// Publish makes sn the state and delivers msgs to every subscriber
// (dropping them for a subscriber whose buffer is full, like a kernel
// socket that overflowed, followed by a Resync).
func (f *Fake) Publish(sn Snapshot, msgs ...Msg) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snap = sn
	for ch := range f.subs {
		for _, msg := range msgs {
			select {
			case ch <- msg:
			default:
			}
		}
	}
}

// FailSnapshots makes Snapshot fail with err until called with nil.
func (f *Fake) FailSnapshots(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// Subscribe implements Source.
func (f *Fake) Subscribe(ctx context.Context) (<-chan Msg, error) {
	ch := make(chan Msg, 256)
	f.mu.Lock()
	if f.subs == nil {
		f.subs = map[chan Msg]struct{}{}
	}
	f.subs[ch] = struct{}{}
	f.mu.Unlock()
	context.AfterFunc(ctx, func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if _, ok := f.subs[ch]; ok {
			delete(f.subs, ch)
			close(ch)
		}
	})
	return ch, nil
}

// Snapshot implements Source.
func (f *Fake) Snapshot(context.Context) (Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads++
	if f.err != nil {
		return Snapshot{}, f.err
	}
	sn := f.snap
	sn.Links = append([]Link(nil), sn.Links...)
	sn.Addrs = append([]Addr(nil), sn.Addrs...)
	sn.Routes = append([]Route(nil), sn.Routes...)
	return sn, nil
}

// Host is a snapshot of a host with one interface: handy for tests of what
// drives a Monitor. gateway may be invalid (no default route); up says
// whether the link has carrier.
func Host(dev string, index int, addr netip.Prefix, gateway netip.Addr, up bool) Snapshot {
	sn := Snapshot{Links: []Link{{Index: 1, Name: "lo", Up: true, Loopback: true}, {Index: index, Name: dev, Up: up, Kind: "veth"}}}
	if addr.IsValid() {
		sn.Addrs = append(sn.Addrs, Addr{Index: index, Prefix: addr})
		if gateway.IsValid() && up {
			sn.Routes = append(sn.Routes, Route{Table: mainTable, Dst: netip.PrefixFrom(netip.IPv4Unspecified(), 0), Gateway: gateway, Index: index})
		}
	}
	return sn
}
