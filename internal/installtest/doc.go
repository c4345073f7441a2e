// Package installtest is the install-and-live-with-it test of issue 17: in a
// VM guest booted with systemd 252 as PID 1 (BTMM_VM_INIT=systemd
// hack/vmexec), the built Debian packages install, systemd starts btmm-dnsd
// and btmmd from them, btmmd reaches "active" only once registered, reload
// re-reads its configuration, and stop leaves no kernel object, record or
// file behind. It has only tests.
package installtest
