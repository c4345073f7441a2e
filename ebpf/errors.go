package ebpf

import "errors"

var (
	// ErrClosed is returned by methods called after Close.
	ErrClosed = errors.New("ebpf dataplane: closed")
)
