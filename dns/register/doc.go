// Package register publishes this host's reachability in DNS (RFC 6281 §3,
// §5.2): RFC 2136 dynamic updates signed with TSIG (RFC 8945), carrying an
// Update Lease option (RFC 9664, EDNS0 option 2, miekg/dns EDNS0_UL).
//
// A host publishes, under its user's domain (see Names):
//
//	<host>.<domain>                   AAAA  its per-boot ULA (package controlplane/identity)
//	_autotunnel._udp.<host>.<domain>  SRV   0 0 <external port> <AutoTunnel label>.<domain>
//	_autotunnel._udp.<host>.<domain>  TXT   Capabilities (dataplanes, keying port, principal, version)
//	<AutoTunnel label>.<domain>       A     the NAT's public address (or our own)
//	_autotunnel._udp.<domain>         PTR   _autotunnel._udp.<host>.<domain> (DNS-SD browse)
//
// Use:
//
//	key, err := register.LoadKeyFile("/etc/btmm/tsig.key", "") // mode 0600, BIND syntax
//	r, err := register.New(register.Config{Domain: "alice.btmm.example.", Host: "laptop",
//		ULA: id.ULA, Label: id.Label(), Key: key, Capabilities: caps}, logger)
//	go r.Run(ctx)                // publish, refresh, back off; deletes the records when ctx ends
//	r.SetOuter(natPublicAddrPort) // from NAT-PMP; published at once
//
// The update server is found by SRV (_dns-update-tls._tcp.<domain> first when
// Config.TLS is set, then _dns-update._udp.<domain>) unless Config.Server
// names it. The lease asked for defaults to 90 minutes; the server's echoed
// lease wins. A server that echoes no lease (BIND) is assumed to have granted
// ours, and the records are refreshed all the same, at 75–85% of the lease.
// Failures back off from 1 s doubling to 5 minutes with equal jitter and drop
// a discovered server so it is looked up again.
//
// TSIG keys come from a file in BIND's syntax (what tsig-keygen and
// `btmm-dnsd adduser` print) that group and others cannot read; Key never
// prints its secret.
package register
