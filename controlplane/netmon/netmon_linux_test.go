package netmon

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

var record = flag.Bool("netmon.record", false, "write the live scenarios to testdata/recorded.json")

// recording is one scenario as it happened on a real kernel.
type recording struct {
	Name   string    `json:"name"`
	Before Snapshot  `json:"before"`
	Msgs   []Msg     `json:"msgs"`
	After  Snapshot  `json:"after"`
	Major  bool      `json:"major"`
	Reason []string  `json:"reasons"`
	Taken  time.Time `json:"-"`
}

// tee records what a Source delivers. While held it reads on (the
// kernel socket must not overflow) but keeps the notifications back, and
// release hands them to the Monitor at once: a scenario's burst then falls
// in one debounce window however long the machine takes to run its `ip`
// commands (under load, a 300 ms gap between two of them split a burst in
// two and changed the verdict's wording). The debounce timing itself is
// tested with synctest (monitor_test.go).
type tee struct {
	Source
	mu     sync.Mutex
	msgs   []Msg // delivered by the kernel since take
	queue  []Msg // not yet handed to the Monitor
	held   bool
	closed bool
	wake   chan struct{}
}

func (t *tee) poke() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

func (t *tee) Subscribe(ctx context.Context) (<-chan Msg, error) {
	in, err := t.Source.Subscribe(ctx)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	if t.wake == nil {
		t.wake = make(chan struct{}, 1)
	}
	t.closed = false
	t.mu.Unlock()
	go func() {
		for m := range in {
			t.mu.Lock()
			t.msgs = append(t.msgs, m)
			t.queue = append(t.queue, m)
			t.mu.Unlock()
			t.poke()
		}
		t.mu.Lock()
		t.closed = true
		t.mu.Unlock()
		t.poke()
	}()
	out := make(chan Msg)
	go func() {
		defer close(out)
		for {
			t.mu.Lock()
			if !t.held && len(t.queue) > 0 {
				m := t.queue[0]
				t.queue = t.queue[1:]
				t.mu.Unlock()
				select {
				case out <- m:
				case <-ctx.Done():
					return
				}
				continue
			}
			done := t.closed && len(t.queue) == 0
			t.mu.Unlock()
			if done {
				return
			}
			select {
			case <-t.wake:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

func (t *tee) hold() {
	t.mu.Lock()
	t.held = true
	t.mu.Unlock()
}

func (t *tee) release() {
	t.mu.Lock()
	t.held = false
	t.mu.Unlock()
	t.poke()
}

func (t *tee) take() []Msg {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := t.msgs
	t.msgs = nil
	return m
}

// TestRecordedScenariosNetNS runs every scenario on this kernel with the
// rtnetlink Source and checks the Monitor's verdict; with -netmon.record it
// writes what it saw for TestReplayRecorded.
func TestRecordedScenariosNetNS(t *testing.T) {
	testenv.RequireNetNS(t)
	h, g1, g2 := netns.New(t, "nmh"), netns.New(t, "nmg"), netns.New(t, "nmg")
	netns.MustVeth(t, h, "eth0", g1, "lan")
	g1.MustAddr(t, "lan", "192.168.1.1/24")
	h.MustAddr(t, "eth0", "192.168.1.2/24")
	h.MustRoute(t, "default", "192.168.1.1", "eth0")

	src := &tee{Source: NewSource(h.NsHandle())}
	m, err := New(src, Config{Debounce: 300 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var changes []Change
	m.RegisterChangeCallback(func(c Change) {
		mu.Lock()
		changes = append(changes, c)
		mu.Unlock()
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	<-m.Ready()
	if st := m.State(); st.Default4.Outer.String() != "192.168.1.2" || st.Default4.Device != "eth0" {
		t.Fatalf("initial state: %v", st)
	}

	var recs []recording
	for _, sc := range scenarios {
		time.Sleep(500 * time.Millisecond) // let the previous scenario's stragglers pass
		src.take()
		mu.Lock()
		changes = nil
		mu.Unlock()
		before, err := src.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		script := strings.NewReplacer("$H", h.Name, "$G1", g1.Name, "$G2", g2.Name).Replace(sc.script)
		src.hold()
		out, err := exec.Command("sh", "-ec", script).CombinedOutput()
		time.Sleep(100 * time.Millisecond) // the last notifications read off the socket
		src.release()
		if err != nil {
			t.Fatalf("%s: %v\n%s", sc.name, err, out)
		}
		// Wait for the verdict (generously: the machine may be busy),
		// then collect until quiet.
		count := func() int {
			mu.Lock()
			defer mu.Unlock()
			return len(changes)
		}
		if !sc.none {
			for deadline := time.Now().Add(30 * time.Second); count() == 0 && time.Now().Before(deadline); {
				time.Sleep(20 * time.Millisecond)
			}
		}
		var got []Change
		for quiet := time.Now(); time.Since(quiet) < 1500*time.Millisecond; time.Sleep(50 * time.Millisecond) {
			mu.Lock()
			if len(changes) > len(got) {
				got = append([]Change(nil), changes...)
				quiet = time.Now()
			}
			mu.Unlock()
		}
		after, err := src.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		major, reasons := false, []string(nil)
		for _, c := range got {
			major = major || c.Major
			reasons = append(reasons, c.Reasons...)
		}
		t.Logf("%s: %d change(s), major=%v %q", sc.name, len(got), major, reasons)
		check(t, sc, len(got), major, reasons)
		recs = append(recs, recording{Name: sc.name, Before: before, Msgs: src.take(), After: after, Major: major, Reason: reasons})
	}
	if *record && !t.Failed() {
		b, err := json.MarshalIndent(recs, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile("testdata/recorded.json", append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
