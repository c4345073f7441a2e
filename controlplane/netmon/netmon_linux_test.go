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

// tee records what a Source delivers.
type tee struct {
	Source
	mu   sync.Mutex
	msgs []Msg
}

func (t *tee) Subscribe(ctx context.Context) (<-chan Msg, error) {
	in, err := t.Source.Subscribe(ctx)
	if err != nil {
		return nil, err
	}
	out := make(chan Msg)
	go func() {
		defer close(out)
		for m := range in {
			t.mu.Lock()
			t.msgs = append(t.msgs, m)
			t.mu.Unlock()
			select {
			case out <- m:
			case <-ctx.Done():
			}
		}
	}()
	return out, nil
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
		if out, err := exec.Command("sh", "-ec", script).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", sc.name, err, out)
		}
		// Collect until quiet: a burst split by scheduling delays may
		// give two changes; their verdicts are merged.
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
