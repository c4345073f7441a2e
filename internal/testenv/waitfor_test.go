package testenv

import (
	"errors"
	"fmt"
	"runtime"
	"testing"
	"time"
)

func TestWaitFor(t *testing.T) {
	n := 0
	WaitFor(t, "third call", 5*time.Second, func() error {
		if n++; n < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if n != 3 {
		t.Fatalf("f called %d times, want 3", n)
	}
	// A condition that never holds fails the test with f's last error.
	ft := &fakeT{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		WaitFor(ft, "never", 300*time.Millisecond, func() error { return errors.New("still not") })
	}()
	<-done
	if ft.msg != "never: not after 300ms: still not" {
		t.Fatalf("failure message %q", ft.msg)
	}
}

// fakeT records Fatalf and ends the goroutine as testing.T does.
type fakeT struct {
	testing.TB
	msg string
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
