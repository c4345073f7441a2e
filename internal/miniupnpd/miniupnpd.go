// Package miniupnpd runs a real NAT-PMP (RFC 6886) / PCP (RFC 6887)
// gateway, miniupnpd 2.3 with its nftables backend, inside a network
// namespace, for natpmp's tests and the lab (recipe and traps in
// REAL-PEERS.md).
//
// Start loads the nftables ruleset miniupnpd expects (it does not create
// its own tables): table inet filter with a forward chain (policy drop,
// established accepted, LAN to WAN accepted, then jump miniupnpd), a nat
// prerouting chain jumping to prerouting_miniupnpd and a nat postrouting
// chain jumping to postrouting_miniupnpd then masquerading out of the WAN
// interface. miniupnpd's own rules live only in the three *miniupnpd chains,
// which Stop flushes (SIGTERM leaves miniupnpd's DNAT rules behind).
package miniupnpd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// Chains miniupnpd writes to, all in table inet filter.
var Chains = []string{"miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"}

// Options describe the gateway. WAN's address must look public
// (miniupnpd refuses RFC 1918, 100.64/10 and the documentation ranges as
// outside addresses: every request then fails with NETWORK_FAILURE).
type Options struct {
	WAN    string       // outside interface, e.g. "wan0"
	LAN    string       // inside interface miniupnpd listens on
	LANNet netip.Prefix // inside network allowed to map ports 1024-65535
	// MinLifetime is miniupnpd's min_lifetime (PCP lifetimes are clamped
	// up to it). Default 120 s.
	MinLifetime time.Duration
	// ExtIP, when set, is the external address miniupnpd reports instead of
	// WAN's (its ext_ip option). It must look public: 2.3.1 refuses to start
	// with a reserved or private one, so it cannot play a double NAT.
	ExtIP netip.Addr
	// KeepRuleset uses the nftables ruleset already in the namespace (the
	// lab loads its own, with the three chains in table inet filter)
	// instead of replacing table inet filter with ours. Start checks the
	// chains exist.
	KeepRuleset bool
}

// Daemon is a running miniupnpd.
type Daemon struct {
	NS   *netns.NS
	Opts Options
	Dir  string // config, pid file and log

	mu  sync.Mutex
	cmd *exec.Cmd
	log testenv.SyncBuffer
}

// Start loads the ruleset into ns and starts miniupnpd there.
func Start(ns *netns.NS, opts Options) (*Daemon, error) {
	if opts.WAN == "" || opts.LAN == "" || !opts.LANNet.IsValid() || !opts.LANNet.Addr().Is4() {
		return nil, fmt.Errorf("miniupnpd: start: need WAN, LAN and an IPv4 LANNet, got %+v", opts)
	}
	if opts.MinLifetime <= 0 {
		opts.MinLifetime = 120 * time.Second
	}
	if _, err := exec.LookPath("miniupnpd"); err != nil {
		if _, err2 := os.Stat("/usr/sbin/miniupnpd"); err2 != nil {
			return nil, fmt.Errorf("miniupnpd: start: %w (apt-get install miniupnpd-nftables)", err)
		}
	}
	dir, err := os.MkdirTemp("", "miniupnpd-"+ns.Name+"-")
	if err != nil {
		return nil, fmt.Errorf("miniupnpd: start: %w", err)
	}
	d := &Daemon{NS: ns, Opts: opts, Dir: dir}
	if err := d.loadRuleset(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "miniupnpd.conf"), []byte(d.config()), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("miniupnpd: write config: %w", err)
	}
	if err := d.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return d, nil
}

// StartT is Start for tests: it fails t on error and stops the daemon at
// cleanup.
func StartT(t testing.TB, ns *netns.NS, opts Options) *Daemon {
	t.Helper()
	d, err := Start(ns, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("miniupnpd log:\n%s", d.Log())
		}
		if err := d.Close(); err != nil {
			t.Errorf("miniupnpd stop: %v", err)
		}
	})
	return d
}

func (d *Daemon) ruleset() string {
	w, l := d.Opts.WAN, d.Opts.LAN
	return `table inet filter {
	chain forward {
		type filter hook forward priority 0; policy drop;
		ct state established,related accept
		iifname "` + l + `" oifname "` + w + `" accept
		jump miniupnpd
	}
	chain miniupnpd {
	}
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		jump prerouting_miniupnpd
	}
	chain prerouting_miniupnpd {
	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		jump postrouting_miniupnpd
		oifname "` + w + `" masquerade
	}
	chain postrouting_miniupnpd {
	}
}
`
}

func (d *Daemon) loadRuleset() error {
	if d.Opts.KeepRuleset {
		for _, ch := range Chains {
			if _, err := d.NS.Run("nft", "list", "chain", "inet", "filter", ch); err != nil {
				return fmt.Errorf("miniupnpd: KeepRuleset but no chain %s in table inet filter: %w", ch, err)
			}
		}
		return nil
	}
	f := filepath.Join(d.Dir, "ruleset.nft")
	if err := os.WriteFile(f, []byte(d.ruleset()), 0o600); err != nil {
		return fmt.Errorf("miniupnpd: write ruleset: %w", err)
	}
	// Re-loading must not duplicate: drop our table first when present.
	d.NS.Run("nft", "delete", "table", "inet", "filter")
	if _, err := d.NS.Run("nft", "-f", f); err != nil {
		return fmt.Errorf("miniupnpd: load ruleset: %w", err)
	}
	if err := d.NS.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		return fmt.Errorf("miniupnpd: enable forwarding: %w", err)
	}
	return nil
}

func (d *Daemon) config() string {
	ext := ""
	if d.Opts.ExtIP.IsValid() {
		ext = "ext_ip=" + d.Opts.ExtIP.String() + "\n"
	}
	return ext + fmt.Sprintf(`ext_ifname=%s
listening_ip=%s
enable_natpmp=yes
enable_upnp=no
ipv6_disable=yes
system_uptime=no
min_lifetime=%d
upnp_table_name=filter
upnp_nat_table_name=filter
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
lease_file=
minissdpdsocket=
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
allow 1024-65535 %s 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
`, d.Opts.WAN, d.Opts.LAN, int(d.Opts.MinLifetime/time.Second), d.Opts.LANNet.Masked())
}

// Start starts a stopped daemon again with the same configuration.
func (d *Daemon) Start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd != nil {
		return errors.New("miniupnpd: start: already running")
	}
	c := d.NS.Command(context.Background(), "miniupnpd", "-f", filepath.Join(d.Dir, "miniupnpd.conf"),
		"-P", filepath.Join(d.Dir, "miniupnpd.pid"), "-d")
	c.Stdout, c.Stderr = &d.log, &d.log
	if err := d.NS.StartCmd(c); err != nil {
		return fmt.Errorf("miniupnpd: %w", err)
	}
	d.cmd = c
	// It listens within ~20 ms; wait for the PCP/NAT-PMP socket. The
	// deadline is generous: under TCG with tests in parallel each `ss`
	// takes a while to start.
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := d.NS.Run("ss", "-Hunl", "sport", "= :5351")
		if strings.Contains(out, ":5351") {
			return nil
		}
		if exited(c.Process.Pid) {
			c.Wait()
			d.cmd = nil
			return fmt.Errorf("miniupnpd: exited at start: %s", d.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("miniupnpd: not listening on 5351 after 20 s: %s", d.Log())
}

// Announce makes miniupnpd send one NAT-PMP announcement and one PCP
// ANNOUNCE to 224.0.0.1 (SIGUSR1).
func (d *Daemon) Announce() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return errors.New("miniupnpd: announce: not running")
	}
	if err := d.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		return fmt.Errorf("miniupnpd: announce: %w", err)
	}
	return nil
}

// Restart stops miniupnpd with its mappings flushed (as a rebooted gateway
// would have none) and starts it again: its epoch starts over from zero
// and it sends a PCP ANNOUNCE.
func (d *Daemon) Restart() error {
	if err := d.Stop(); err != nil {
		return err
	}
	return d.Start()
}

// Stop ends miniupnpd (SIGTERM, SIGKILL after 3 s) and flushes the chains
// it wrote to. The ruleset stays loaded.
func (d *Daemon) Stop() error {
	d.mu.Lock()
	c := d.cmd
	d.cmd = nil
	d.mu.Unlock()
	if c != nil && c.Process != nil {
		c.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			c.Process.Kill()
			<-done
		}
	}
	var errs []error
	for _, ch := range Chains {
		if _, err := d.NS.Run("nft", "flush", "chain", "inet", "filter", ch); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("miniupnpd: flush chains: %w", err)
	}
	return nil
}

// Rules returns the rules miniupnpd has installed (nft syntax), one per
// line, without the chain headers.
func (d *Daemon) Rules() (string, error) {
	var b strings.Builder
	for _, ch := range Chains {
		out, err := d.NS.Run("nft", "list", "chain", "inet", "filter", ch)
		if err != nil {
			return "", fmt.Errorf("miniupnpd: list rules: %w", err)
		}
		for _, l := range strings.Split(out, "\n") {
			l = strings.TrimSpace(l)
			if l == "" || strings.HasPrefix(l, "table ") || strings.HasPrefix(l, "chain ") || l == "}" {
				continue
			}
			b.WriteString(l + "\n")
		}
	}
	return b.String(), nil
}

// Log returns what miniupnpd printed so far.
func (d *Daemon) Log() string {
	return d.log.String()
}

// exited reports whether pid is gone or a zombie.
func exited(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

// Close stops miniupnpd (as Stop) and removes its directory.
func (d *Daemon) Close() error {
	err := d.Stop()
	os.RemoveAll(d.Dir)
	return err
}
