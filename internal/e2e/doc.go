// Package e2e runs the whole btmm system in the lab (internal/lab): the real
// btmm-dnsd and MIT krb5kdc in the "internet" namespace, miniupnpd on the NAT
// gateways, and btmmd on hosts behind them, then checks that the hosts find
// each other through DNS, key with Kerberos and reach each other's ULAs over
// ESP-in-UDP in the kernel. ESP needs the VM tier on a kernel without esp4.
//
// With BTMM_DEMO=1 the test narrates what it does (hack/demo uses that).
package e2e
