package testenv

import (
	"testing"
	"time"
)

// WaitFor calls f every 200 ms until it returns nil, and fails the test
// with what, the timeout and f's last error if it has not by then.
func WaitFor(t testing.TB, what string, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: not after %v: %v", what, timeout, err)
}
