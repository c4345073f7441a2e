// Package vmsmoke holds the smoke tests that prove btmm's test tiers end to
// end: tunnel-mode ESP-in-UDP (RFC 3948) between two IPv6 ULAs, programmed
// through XFRM netlink from Go. On a kernel without ESP the test skips with a
// "vm tier" reason; `make test-vm` runs it inside Debian's 6.1 kernel.
package vmsmoke
