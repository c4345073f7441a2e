// Command btmmd: see the usage text below (`btmmd --help`).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jcmturner/gokrb5/v8/config"
	"github.com/jcmturner/gokrb5/v8/keytab"
	"github.com/miekg/dns"
	"github.com/vishvananda/netns"

	"github.com/btmm/btmm/cmd/internal/cli"
	"github.com/btmm/btmm/controlplane"
	"github.com/btmm/btmm/controlplane/agent"
	"github.com/btmm/btmm/controlplane/identity"
	"github.com/btmm/btmm/controlplane/keying"
	"github.com/btmm/btmm/controlplane/netmon"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/ebpf"
	"github.com/btmm/btmm/xfrm"
)

const synopsis = `btmmd: the btmm host agent (RFC 6281 Back to My Mac for Linux).

Usage: btmmd [flags]

Registers this host's IPv6 ULA under the user's domain, maps the tunnel port on
the NAT gateway, tracks the user's other hosts and programs kernel tunnels to them.
Runs as root until SIGINT/SIGTERM, then removes its DNS records, NAT mappings
and every kernel object it made. Inspect it with btmmctl, ip xfrm, ip -6 route.`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmmd", synopsis)
	cfgPath := fs.String("config", "/etc/btmm/btmmd.toml", "configuration file (TOML, see docs/btmmd.md)")
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(stderr, "btmmd:", errNotRoot)
		return 1
	}
	cfg, err := loadConfig(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, "btmmd:", err)
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); cfg.LogLevel != "" && err != nil {
		fmt.Fprintln(stderr, "btmmd: log_level:", err)
		return 2
	}
	cfg.level = new(slog.LevelVar)
	cfg.level.Set(level)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.level}))
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP) // reload (systemd.go), never the default: exit leaving state behind
	defer signal.Stop(hup)
	unlock, err := preflight(cfg)
	if err != nil {
		fmt.Fprintln(stderr, "btmmd:", err)
		return 1
	}
	defer unlock()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, log, hup); err != nil {
		log.Error("btmmd stopped", "err", err)
		return 1
	}
	return 0
}

func serve(ctx context.Context, cfg *Config, log *slog.Logger, hup <-chan os.Signal) error {
	id, err := identity.Load(identity.Config{StatePath: cfg.StateFile})
	if err != nil {
		return err
	}
	log.Info("identity", "ula", id.ULA, "label", id.Label(), "source", id.Source)

	key, err := register.LoadKeyFile(cfg.DNS.KeyFile, "")
	if err != nil {
		return err
	}
	if err := checkKeyName(key.Name, cfg, log); err != nil {
		return err
	}
	auth, principal, err := keyingAuth(cfg)
	if err != nil {
		return err
	}
	regCfg := register.Config{Key: key, Zone: cfg.DNS.Zone, Server: cfg.DNS.Server, Resolver: cfg.DNS.Resolver,
		AcceptUnsigned: cfg.DNS.AcceptUnsigned}
	if cfg.DNS.Lease != "" {
		if regCfg.Lease, err = time.ParseDuration(cfg.DNS.Lease); err != nil {
			return fmt.Errorf("dns.lease: %w", err)
		}
	}
	if cfg.DNS.TLS {
		if regCfg.TLS, err = tlsConfig(cfg.DNS.CAFile); err != nil {
			return err
		}
	}

	conn, err := xfrm.Listen(ctx, netip.AddrPortFrom(netip.IPv4Unspecified(), cfg.Tunnel.Port))
	if err != nil {
		return err
	}
	defer conn.Close()

	dp, kernelEvents, err := dataplane(ctx, cfg, log)
	if err != nil {
		return err
	}
	ac := agent.Config{
		Identity: id, Host: cfg.Host, Domain: cfg.Domain, TunnelPort: cfg.Tunnel.Port,
		Dataplane: dp, DataplaneName: cfg.Tunnel.Dataplane, Transport: conn, Auth: auth, Principal: principal,
		Register: regCfg, KernelEvents: kernelEvents, Logger: log,
		Keying: keyingConfig(cfg), PrincipalFor: principalFor(cfg),
	}
	var llqStatus func() (llqclient.Status, bool)
	ac.Peers, ac.Rebind, llqStatus = peersFunc(cfg, key, regCfg.TLS, log.With("part", "peers"))
	ac.LLQStatus = llqStatus
	ac.Tunnels = tunnelsConfig(cfg, log.With("part", "tunnels"))
	if cfg.NAT.Mode == "off" {
		ac.External = netip.MustParseAddrPort(cfg.NAT.External)
	} else {
		var fouPort uint16
		if ac.Tunnels != nil {
			fouPort = ac.Tunnels.FOUPort
		}
		ac.NAT, ac.Rediscover = natFunc(log.With("part", "nat"), fouPort)
	}
	ac.Device, ac.Keepalive = cfg.Tunnel.Device, cfg.keepalive
	if *cfg.Network.Follow {
		if ac.NetMon, err = netmon.New(netmon.NewSource(netns.None()), netmon.Config{Debounce: cfg.debounce, Logger: log.With("part", "netmon")}); err != nil {
			dp.Close()
			return err
		}
	}
	if ac.Paths, err = pathsConfig(cfg, key); err != nil {
		dp.Close()
		return err
	}
	if ac.Tunnels != nil && ac.Tunnels.IPv6 {
		// The keying channel over IPv6 too (c-v6 peers, IPv6-only hosts).
		conn6, err := xfrm.Listen6(ctx, netip.AddrPortFrom(netip.IPv6Unspecified(), cfg.Tunnel.Port))
		if err != nil {
			log.Warn("tunnels: no IPv6 keying socket; ipv6 tunnels off", "err", err)
			ac.Tunnels.IPv6 = false
		} else {
			defer conn6.Close()
			dual, err := xfrm.NewDual(conn, conn6)
			if err != nil {
				dp.Close()
				return err
			}
			defer dual.Close() // first: ends its readers, even one blocked on a full channel
			ac.Transport = dual
		}
	}
	a, err := agent.New(ac)
	if err != nil {
		dp.Close()
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := startMetrics(ctx, cfg, a, llqStatus, log.With("part", "metrics")); err != nil {
		dp.Close()
		return err
	}
	go newService(cfg, a, llqStatus, &reloader{cfg: cfg, level: cfg.level, key: key, auth: auth}, log).run(ctx, hup)
	ctlErr := make(chan error, 1)
	go func() {
		err := agent.ServeControl(ctx, cfg.ControlSocket, a)
		if err != nil {
			log.Error("control socket failed; stopping", "err", err)
			cancel()
		}
		ctlErr <- err
	}()
	namesDone := runNames(ctx, cfg, a, log.With("part", "names"))
	err = a.Run(ctx)
	<-namesDone
	return errors.Join(err, <-ctlErr)
}

// checkKeyName: the key should be this host's own (`btmm-dnsd addhost USER
// HOST`, named HOST.<domain>); the user's key (named <domain>) works but may
// change every host's records, so it is only warned about.
func checkKeyName(name string, cfg *Config, log *slog.Logger) error {
	domain := dns.CanonicalName(cfg.Domain)
	switch dns.CanonicalName(name) {
	case dns.CanonicalName(cfg.Host + "." + domain):
		return nil
	case domain:
		log.Warn("dns.key_file holds the user's key, which may change every host's records; give this host its own: btmm-dnsd addhost USER HOST", "key", name)
		return nil
	}
	return fmt.Errorf("dns.key_file: key %s is neither this host's (%s) nor the user's (%s)", name, cfg.Host+"."+domain, domain)
}

func keyingAuth(cfg *Config) (keying.Auth, string, error) {
	if cfg.Keying.Mode == "psk" {
		psk, err := keying.LoadPSK(cfg.Keying.PSKFile)
		return psk, "", err
	}
	kt, err := keytab.Load(cfg.Keying.Keytab)
	if err != nil {
		return nil, "", fmt.Errorf("keying: keytab %s: %w", cfg.Keying.Keytab, err)
	}
	kc, err := config.Load(cfg.Keying.Krb5Conf)
	if err != nil {
		return nil, "", fmt.Errorf("keying: krb5 config %s: %w", cfg.Keying.Krb5Conf, err)
	}
	principal := cfg.Keying.Principal
	if principal == "" {
		principal = keying.DefaultPrincipal(cfg.Host, cfg.Domain, cfg.Keying.Realm)
	}
	return &keying.Kerberos{Principal: principal, Realm: cfg.Keying.Realm, Keytab: kt, Krb5Conf: kc}, principal, nil
}

func tlsConfig(caFile string) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("dns.ca_file: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("dns.ca_file %s: no certificates", caFile)
		}
	}
	return tc, nil
}

// dataplane builds the configured kernel dataplane in btmmd's own namespace.
// The xfrm dataplane's events are forwarded until ctx ends; after that they
// are drained (and dropped) until the dataplane closes its channel, so the
// forwarder never blocks shutdown.
func dataplane(ctx context.Context, cfg *Config, log *slog.Logger) (controlplane.Dataplane, <-chan agent.KernelEvent, error) {
	switch cfg.Tunnel.Dataplane {
	case "ebpf", "ebpf-cleartext":
		if err := ensureBPFFS("/sys/fs/bpf"); err != nil {
			return nil, nil, err
		}
		clear := cfg.Tunnel.Dataplane == "ebpf-cleartext"
		if clear {
			log.Warn("INSECURE: ebpf-cleartext carries IPv6 in UDP WITHOUT ENCRYPTION")
		}
		dp, err := ebpf.New(ebpf.Config{Device: cfg.Tunnel.Device, Cleartext: clear, Logger: log.With("part", "ebpf")})
		return dp, nil, err
	}
	self, err := netns.Get()
	if err != nil {
		return nil, nil, err
	}
	defer self.Close()
	// The kernel's hard limit is the backstop for a dead btmmd; keying
	// removes SAs at their hard end itself (keying.go).
	dp, err := xfrm.New(self, xfrm.Config{Logger: log.With("part", "xfrm"), Lifetime: xfrm.Lifetime{HardAdd: keying.HardLimit(keyingConfig(cfg))}})
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan agent.KernelEvent, 16)
	go func() {
		defer close(ch)
		for ev := range dp.Events() {
			if ctx.Err() != nil {
				continue // shutting down: drain until Close
			}
			log.Info("kernel event", "event", ev.String())
			if !ev.Peer.IsValid() {
				continue
			}
			var out agent.KernelEvent
			switch ev.Kind {
			case xfrm.Mapping:
				out = agent.KernelEvent{Peer: ev.Peer, New: ev.New}
			case xfrm.SoftExpire:
				out = agent.KernelEvent{Peer: ev.Peer, Rekey: true}
			default:
				continue
			}
			select {
			case ch <- out:
			case <-ctx.Done():
			}
		}
	}()
	return dp, ch, nil
}

// ensureBPFFS mounts a bpffs at dir unless one is there (pins need it; some
// distributions do not mount it by default).
func ensureBPFFS(dir string) error {
	const bpfFSMagic = 0xcafe4a11
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err == nil && st.Type == bpfFSMagic {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("bpffs: %w", err)
	}
	if err := syscall.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", dir, err)
	}
	return nil
}
