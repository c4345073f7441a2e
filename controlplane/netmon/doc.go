// Package netmon watches this host's own network — links, addresses and
// routes, through rtnetlink (RFC 3549; the RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR,
// RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV4_ROUTE and RTNLGRP_IPV6_ROUTE groups) —
// and tells btmmd when it changed in a way that matters for its tunnels
// (RFC 6281 §5.1–5.2: a host whose network changes re-maps its port and
// re-registers at once).
//
// A Monitor subscribes once, debounces bursts (a move is a dozen messages:
// carrier down, address deleted, routes flushed, new address, new default
// route), then reads a snapshot and compares it with the last one. A change
// is Major when the IPv4 default route's device or gateway changed, the
// outer address (the source the kernel uses on that route) changed, the
// default route appeared or went away (offline and back), or the default
// route's link went down and up. Everything else — our own ULA, xfrm and
// BPF objects, /128 routes in other tables, links that carry no default
// route, IPv6-only changes (btmm's outer header is IPv4) — is noise: it is
// reported with Major false, or filtered before it costs a snapshot.
//
// The kernel side is the Source interface (rtnetlink on Linux, a scripted
// fake in tests); the classification works on snapshots and is tested on
// message sequences and snapshots recorded from a real kernel
// (testdata/*.json). Modelled on tailscale's net/netmon.
package netmon
