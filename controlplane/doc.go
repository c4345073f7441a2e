// Package controlplane is the pure-Go heart of btmmd (RFC 6281 §3, §7): the
// desired-state types that describe this host and its peers, the Dataplane
// interface that kernel backends (package xfrm, package ebpf) implement, and the
// reconciler that turns peer and NAT-mapping updates into Dataplane.Set calls.
// It has no build tags and touches no kernel state itself.
package controlplane
