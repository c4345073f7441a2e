// Package xfrm programs the Linux IPsec stack (XFRM, RFC 4301 via netlink) for
// the BTMM wire format of RFC 6281 §2 Figure 2 and §7.3: IPv4 | UDP | ESP | IPv6,
// tunnel-mode ESP between hosts' IPv6 ULAs with UDP encapsulation (RFC 3948).
// Go only programs the kernel; packets never pass through this package.
//
// Two pieces:
//
//   - Conn is the UDP encapsulation socket (UDP_ENCAP_ESPINUDP) on the tunnel
//     port. The kernel takes the ESP packets arriving on it; keying messages
//     travel on the same socket behind RFC 3948's non-ESP marker (four zero
//     bytes), so one NAT mapping serves both. Some process must hold a Conn
//     open on the tunnel port, or inbound ESP-in-UDP is UDP to a closed port.
//   - Dataplane implements controlplane.Dataplane: per peer a pair of
//     tunnel-mode SAs (outer IPv4 + UDP encapsulation, inner IPv6 /128
//     selectors), out/in/fwd policies, the local ULA on an xfrm interface
//     (lo when the kernel has no xfrm interfaces) and /128 routes to peers'
//     ULAs with an MTU that accounts for the ESP-in-UDP overhead.
//
// Every kernel object the Dataplane makes carries its tag (Config.Reqid on
// states and policy templates, Config.IfID on everything when the xfrm
// interface exists, Config.RouteProtocol on routes); it never touches other
// objects. Outer address or port changes move SAs with XFRM_MSG_MIGRATE, or by
// re-adding them with their replay state, without rekeying. The kernel's
// XFRM_MSG_MAPPING and soft/hard expire notifications are surfaced as Events.
// See docs/xfrm.md.
package xfrm
