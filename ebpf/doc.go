// Package ebpf is btmm's eBPF encapsulation dataplane (RFC 6281 §7.3.2): ESP
// security associations bound to the hosts' ULAs, and TC programs that swap the
// outer IPv4/UDP header, so a change of address is one map update.
package ebpf
