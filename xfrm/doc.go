// Package xfrm programs the Linux IPsec stack (XFRM, RFC 4301 via netlink) for
// the BTMM wire format of RFC 6281 §2 Figure 2 and §7.3: IPv4 | UDP | ESP | IPv6,
// tunnel-mode ESP between hosts' IPv6 ULAs with UDP encapsulation (RFC 3948).
// Go only programs the kernel; packets never pass through this package.
package xfrm
