package llqclient

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/dns/register/registertest"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// BIND implements neither LLQ nor its option: the client must notice, poll,
// say so in Status, and still see changes.
func TestPollingFallbackAgainstBIND(t *testing.T) {
	key, err := register.NewKey("alice.btmm.example", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==")
	if err != nil {
		t.Fatal(err)
	}
	server := registertest.StartNamed(t, "alice.btmm.example.", key, key.Name,
		"laptop IN AAAA fd00::1")
	c, err := New(Config{Domain: "alice.btmm.example.", Resolver: server, Key: key,
		PollInterval: time.Second, RetryLLQ: time.Hour, Timeout: 300 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	got := make(chan []string, 16)
	c.Watch("laptop.alice.btmm.example.", dns.TypeAAAA, func(rrs []dns.RR) {
		var s []string
		for _, rr := range rrs {
			s = append(s, rr.(*dns.AAAA).AAAA.String())
		}
		got <- s
	})
	wait := func(want ...string) {
		t.Helper()
		for {
			select {
			case s := <-got:
				if slices.Equal(s, want) {
					return
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("never saw %q; status %+v", want, c.Status())
			}
		}
	}
	wait("fd00::1")
	// The first answer can arrive from the initial query while the LLQ
	// setup towards BIND is still in flight: Status reports polling once
	// BIND's answer without the LLQ option has been seen.
	testenv.WaitFor(t, "status reports polling", 10*time.Second, func() error {
		st := c.Status()
		if st.Server != server || st.Polling != 1 || st.Queries[0].Mode != ModePolling || st.Queries[0].Reason != "server does not support LLQ" {
			return fmt.Errorf("status = %+v", st)
		}
		return nil
	})
	// A change reaches us by polling (every ~1 s here).
	up := new(dns.Msg)
	up.SetUpdate("alice.btmm.example.")
	rr, _ := dns.NewRR("laptop.alice.btmm.example. 60 IN AAAA fd00::2")
	up.Insert([]dns.RR{rr})
	up.SetTsig(key.Name, key.Algorithm, 300, time.Now().Unix())
	if r, _, err := (&dns.Client{TsigProvider: key.Provider()}).Exchange(up, server); err != nil || r.Rcode != dns.RcodeSuccess {
		t.Fatalf("update: %v %v", r, err)
	}
	wait("fd00::1", "fd00::2")
}
