package nldump

import (
	"errors"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
)

func TestRetry(t *testing.T) {
	for _, tc := range []struct {
		name      string
		fails     int   // interrupted dumps before a clean one
		other     error // returned instead of a result, if set
		wantCalls int
		wantErr   error
		wantN     int
	}{
		{name: "clean", fails: 0, wantCalls: 1, wantN: 2},
		{name: "interrupted twice", fails: 2, wantCalls: 3, wantN: 2},
		{name: "interrupted on the last attempt but one", fails: Attempts - 1, wantCalls: Attempts, wantN: 2},
		{name: "always interrupted", fails: Attempts, wantCalls: Attempts, wantErr: netlink.ErrDumpInterrupted},
		{name: "other error", other: syscall.EPERM, wantCalls: 1, wantErr: syscall.EPERM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			r, err := Retry(func() ([]int, error) {
				calls++
				if tc.other != nil {
					return nil, tc.other
				}
				if calls <= tc.fails {
					return []int{1}, netlink.ErrDumpInterrupted // a partial result
				}
				return []int{1, 2}, nil
			})
			if calls != tc.wantCalls {
				t.Errorf("f called %d times, want %d", calls, tc.wantCalls)
			}
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Errorf("err %v, want %v", err, tc.wantErr)
			}
			if len(r) != tc.wantN {
				t.Errorf("result %v, want %d objects (never a partial dump)", r, tc.wantN)
			}
		})
	}
}
