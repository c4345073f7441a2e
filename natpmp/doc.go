// Package natpmp maps the tunnel port on the local NAT gateway with PCP
// (RFC 6887) and NAT-PMP (RFC 6886), as RFC 6281 §4 requires, and reports the
// external address and port whenever they change.
package natpmp
