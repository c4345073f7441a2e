// Package dns holds btmm's DNS protocol pieces (RFC 6281 §5): RFC 2136 dynamic
// update with TSIG (RFC 8945), update leases (RFC 9664), and Long-Lived Queries
// (RFC 8764), for both the rendezvous server btmm-dnsd and the host agent.
package dns
