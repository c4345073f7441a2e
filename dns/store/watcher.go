package store

import (
	"context"
	"sync"
)

// Watcher is one Watch subscriber of a Store: an unbounded queue in front of
// its channel, so that a committer never blocks on a watcher (a watcher may
// itself commit, as the lease expirer does).
type Watcher struct {
	ctx   context.Context
	ch    chan Change
	mu    sync.Mutex
	cond  *sync.Cond
	queue []Change
	done  bool
}

// NewWatcher starts delivering what Push queues to C, in order, until Stop
// or ctx ends; C is closed then.
func NewWatcher(ctx context.Context) *Watcher {
	w := &Watcher{ctx: ctx, ch: make(chan Change, 16)}
	w.cond = sync.NewCond(&w.mu)
	context.AfterFunc(ctx, w.Stop)
	go w.pump()
	return w
}

// C is the channel the changes arrive on.
func (w *Watcher) C() <-chan Change { return w.ch }

// Push queues c; it never blocks.
func (w *Watcher) Push(c Change) {
	w.mu.Lock()
	w.queue = append(w.queue, c)
	w.mu.Unlock()
	w.cond.Signal()
}

// Stop ends the delivery (what is still queued is dropped) and closes C.
func (w *Watcher) Stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
	w.cond.Signal()
}

// pump moves queued changes to the channel until stopped or ctx ends.
func (w *Watcher) pump() {
	defer close(w.ch)
	for {
		w.mu.Lock()
		for len(w.queue) == 0 && !w.done {
			w.cond.Wait()
		}
		if w.done {
			w.mu.Unlock()
			return
		}
		c := w.queue[0]
		w.queue = w.queue[1:]
		w.mu.Unlock()
		select {
		case w.ch <- c:
		case <-w.ctx.Done():
			return
		}
	}
}
