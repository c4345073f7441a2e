package ebpf

import "errors"

var (
	// ErrClosed is returned by methods called after Close.
	ErrClosed = errors.New("ebpf dataplane: closed")
	// ErrDevice is returned when the desired state names another device
	// than the one the programs are attached to.
	ErrDevice = errors.New("ebpf dataplane: device mismatch")
)
