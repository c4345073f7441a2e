// Package relay is btmm-relay's kernel forwarder: a TC ingress program
// (bpf/relay.c; TCX on kernels >= 6.6, clsact + cls_bpf before) that
// forwards ESP-in-UDP (RFC 3948) between hosts bound to the relay's
// allocations, rewriting outer addresses and ports from a map that the
// relay's Go side (package controlplane/relay) writes. It implements
// controlplane/relay.Forwarder; the relay's Go process handles only control
// messages and non-ESP datagrams (keying, probes), so a bulk transfer through
// the relay costs it no CPU. It shares the kernel declarations (bpf/btmm.h)
// and the bpf2go build of package ebpf.
//
// Kernel objects: the program's maps (unpinned, gone with the process), a
// TCX link (closed with the process) or a clsact filter with handle 0xb7e1
// and priority 0xb7e1 on the device, removed by Close and replaced at the
// next start after a crash.
package relay
