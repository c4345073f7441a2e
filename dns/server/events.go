package server

import (
	"bytes"
	"errors"
	"fmt"
	"hash/maphash"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/tsig"
	"golang.org/x/net/ipv4"
)

// eventSender signs and sends LLQ events; dns/llq hands it all the events
// of one store change at once (one call at a time). UDP events leave in
// sendmmsg batches, each from the address its client talked to; stream
// events are queued on their connection. A large fan-out is split by key
// over one worker per CPU: each key's events stay with one worker, which
// keeps the key's HMAC state from one change to the next.
type eventSender struct {
	s       *Server
	workers []*eventWorker
	seed    maphash.Seed
}

func newEventSender(s *Server) *eventSender {
	e := &eventSender{s: s, seed: maphash.MakeSeed()}
	for range runtime.GOMAXPROCS(0) {
		e.workers = append(e.workers, &eventWorker{s: s, signers: map[string]signerFor{}})
	}
	return e
}

const (
	// eventBatch is how many UDP events one sendmmsg carries.
	eventBatch = 64
	// perWorker is the least number of events worth another worker.
	perWorker = 512
	// maxSigners bounds each worker's cache of HMAC states.
	maxSigners = 1 << 15
)

func (e *eventSender) SendEvents(evs []llq.Event) error {
	if f := e.s.cfg.OnEvents; f != nil {
		start := time.Now()
		defer func() { f(len(evs), time.Since(start)) }()
	}
	n := min(len(e.workers), (len(evs)+perWorker-1)/perWorker)
	if n <= 1 {
		return e.workers[0].send(evs)
	}
	parts := make([][]llq.Event, n)
	for _, ev := range evs {
		w := maphash.String(e.seed, ev.Key) % uint64(n)
		parts[w] = append(parts[w], ev)
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = e.workers[i].send(parts[i])
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// signerFor is a cached Signer, the secret it was made with and the
// keyring's generation when it was last found current: while the keyring
// has not changed it is used without a look-up; after a change it is
// checked once against the key (same name, new secret: a new Signer).
type signerFor struct {
	secret, alg string
	gen         uint64
	sg          *tsig.Signer
}

// eventWorker signs and sends; only one goroutine uses it at a time.
type eventWorker struct {
	s       *Server
	signers map[string]signerFor
	arena   []byte // signed events of the batch in flight
	batch   []ipv4.Message
	evs     []llq.Event // the batch's events, for errors
	errs    []error
}

func (w *eventWorker) fail(ev llq.Event, err error) {
	w.errs = append(w.errs, fmt.Errorf("server: send event for LLQ %d to %s: %w", ev.LLQ, ev.Peer.Addr, err))
}

// signer returns the Signer of the key named name, nil when the key is
// gone (the event then goes unsigned, as before the key was removed the
// client could not have told).
func (w *eventWorker) signer(name string) (*tsig.Signer, error) {
	gen := w.s.keys.Generation() // before the look-up: a change after it is seen next time
	c, cached := w.signers[name]
	if cached && c.gen == gen {
		return c.sg, nil
	}
	k, ok := w.s.keys.Get(name)
	if !ok {
		delete(w.signers, name)
		return nil, nil
	}
	if cached && c.alg == k.Algorithm && c.secret == string(k.Secret) {
		c.gen = gen
		w.signers[name] = c
		return c.sg, nil
	}
	sg, err := k.Signer()
	if err != nil {
		return nil, err
	}
	if len(w.signers) >= maxSigners {
		clear(w.signers)
	}
	w.signers[name] = signerFor{secret: string(k.Secret), alg: k.Algorithm, gen: gen, sg: sg}
	return sg, nil
}

func (w *eventWorker) send(evs []llq.Event) error {
	s := w.s
	now := uint64(s.cfg.Now().Unix())
	fudge := s.fudge()
	w.errs = nil
	var pc *ipv4.PacketConn
	for _, ev := range evs {
		start := len(w.arena)
		data := ev.Wire
		if ev.Key != "" {
			sg, err := w.signer(ev.Key)
			if err != nil {
				w.fail(ev, err)
				continue
			}
			if sg != nil {
				if w.arena, err = sg.Sign(w.arena, ev.Wire, now, fudge); err != nil {
					w.fail(ev, err)
					continue
				}
				data = w.arena[start:len(w.arena):len(w.arena)]
			}
		}
		switch ev.Peer.Net {
		case "udp":
			if s.udp == nil {
				w.fail(ev, errors.New("no UDP listener"))
				continue
			}
			m := ipv4.Message{Buffers: [][]byte{data}}
			if sess, ok := ev.Peer.Reply.(*udpSession); ok {
				m.Addr, m.OOB = sess.raddr, sess.oob // from the address the client used
			} else {
				ap, err := netip.ParseAddrPort(ev.Peer.Addr) // restored after a restart
				if err != nil {
					w.fail(ev, err)
					continue
				}
				m.Addr = net.UDPAddrFromAddrPort(ap)
				if ev.Peer.Local != "" {
					m.OOB = srcOOB(net.ParseIP(ev.Peer.Local)) // the address the client used
				}
			}
			if pc == nil {
				pc = ipv4.NewPacketConn(s.udp)
			}
			w.batch = append(w.batch, m)
			w.evs = append(w.evs, ev)
			if len(w.batch) == eventBatch {
				w.flush(pc)
			}
		case "tcp":
			sc, ok := ev.Peer.Conn.(*streamConn)
			if !ok {
				w.fail(ev, errors.New("no connection"))
				continue
			}
			if err := sc.queueEvent(bytes.Clone(data)); err != nil {
				w.fail(ev, err)
			}
		default:
			w.fail(ev, fmt.Errorf("unknown network %q", ev.Peer.Net))
		}
	}
	if len(w.batch) > 0 {
		w.flush(pc)
	}
	w.arena = w.arena[:0]
	return errors.Join(w.errs...)
}

// flush sends the batch with sendmmsg; a datagram the kernel refuses is
// reported and skipped, the rest still go.
func (w *eventWorker) flush(pc *ipv4.PacketConn) {
	for ms, evs := w.batch, w.evs; len(ms) > 0; {
		n, err := pc.WriteBatch(ms, 0)
		if err != nil && n <= 0 {
			w.fail(evs[0], err)
			n = 1
		}
		ms, evs = ms[n:], evs[n:]
	}
	clear(w.batch) // drop the references to the arena and the addresses
	clear(w.evs)
	w.batch, w.evs = w.batch[:0], w.evs[:0]
	if cap(w.arena) > 1<<20 {
		w.arena = nil // after a burst, do not keep a large arena
	} else {
		w.arena = w.arena[:0]
	}
}
