package server

import (
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/btmm/btmm/dns/lease"
	"github.com/btmm/btmm/dns/tsig"
)

// Config configures a Server. The zero values of the optional fields take
// the defaults shown in docs/dnsd.md.
type Config struct {
	// Zone is the rendezvous zone, e.g. "btmm.example.". Required.
	Zone string `toml:"zone"`
	// ServerName is the primary server's name (SOA MNAME, NS, SRV target);
	// default "ns.<zone>". ServerAddrs are its addresses (glue A/AAAA when
	// ServerName is in the zone).
	ServerName  string   `toml:"server_name"`
	ServerAddrs []string `toml:"server_addrs"`
	// DataDir holds the store (store/), user keys (keys/<user>.key, 0600)
	// and a generated self-signed TLS certificate (tls/). Required.
	DataDir string `toml:"data_dir"`
	// Listen is the UDP and TCP address (same port for both), e.g.
	// "127.0.0.1:0" or "[::]:53". Empty: no plain DNS listener.
	Listen string `toml:"listen"`
	// ListenTLS is the DNS-over-TLS address (RFC 7858), e.g. "[::]:853".
	ListenTLS string `toml:"listen_tls"`
	// TLSCert / TLSKey are PEM files; when empty and ListenTLS is set a
	// self-signed certificate for ServerName is generated in DataDir/tls.
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// AdvertisePorts overrides the ports in the discovery SRV records (for
	// a server behind port forwarding); zero: the bound ports.
	AdvertiseDNSPort uint16 `toml:"advertise_dns_port"`
	AdvertiseTLSPort uint16 `toml:"advertise_tls_port"`

	// TSIGFudge is the server's TSIG time window (RFC 8945 §5.2.3): a
	// request signed further from the server's clock is refused with
	// BADTIME, whatever fudge the signer claims. Default 5m.
	TSIGFudge Duration `toml:"tsig_fudge"`

	// Relays are btmm-relay servers published as SRV
	// _btmm-relay._udp.<zone> (and at each user's apex), docs/paths.md.
	Relays []RelayConfig `toml:"relay"`
	// PublicRecords turns private records off. With private records (the
	// default) queries for names below a user's domain must be signed by a
	// key of that user; the SOA/NS at the user's apex and the discovery
	// SRVs stay public.
	PublicRecords bool `toml:"public_records"`
	// AppleCompat lists the users ("*": all) whose zones accept what
	// Apple's client sends unsigned over UDP: queries and LLQ setup,
	// refresh and acknowledgements. Their records are then public (private
	// records off) and their LLQ events unsigned. Default: none.
	AppleCompat []string `toml:"apple_compat"`

	// MetricsListen is where btmm-dnsd serves Prometheus metrics
	// (ADDRESS:PORT, local); "" (default) = off. The server itself only
	// calls OnUpdate.
	MetricsListen string `toml:"metrics_listen"`
	// OnUpdate, if set, is called after each authenticated UPDATE was
	// answered, with the answer's rcode and the time it took (for metrics).
	OnUpdate func(rcode int, took time.Duration) `toml:"-"`
	// OnEvents, if set, is called after the LLQ events of one change (or of
	// one retransmission round) were signed and handed to the kernel or to
	// their connections, with their number and the time that took (for
	// metrics: the server's own share of an event's latency).
	OnEvents func(events int, took time.Duration) `toml:"-"`
	// OnLLQChange, if set, is called after the LLQ events of one committed
	// change were sent, with the time from the commit to the last one sent
	// (first transmissions). OnStoreSync gets each fsync of the embedded
	// store's log (not called with etcd).
	OnLLQChange func(events int, took time.Duration) `toml:"-"`
	OnStoreSync func(took time.Duration)             `toml:"-"`

	UpdateLease LeaseConfig `toml:"update_lease"`
	LLQ         LLQConfig   `toml:"llq"`
	Limits      Limits      `toml:"limits"`

	// Store selects the record store: "embedded" (default: DataDir/store,
	// one server) or "etcd" (replicas sharing an etcd cluster, see Etcd).
	Store string     `toml:"store"`
	Etcd  EtcdConfig `toml:"etcd"`

	// Keys are user keys to install at New (tests and embedding): each must
	// be named "<user>.<zone>"; it is written to DataDir/keys (0600) unless
	// that user already has a key file, which must then hold the same key.
	Keys []tsig.Key `toml:"-"`

	// Now is the clock (default time.Now).
	Now func() time.Time `toml:"-"`
}

// RelayConfig is one [[relay]] table.
type RelayConfig struct {
	Name  string   `toml:"name"`  // e.g. "relay.btmm.example."
	Port  uint16   `toml:"port"`  // STUN/control port, e.g. 3478
	Addrs []string `toml:"addrs"` // A/AAAA for a name inside the zone
	// TLSPort is its TLS stream port for hosts whose UDP is blocked
	// (relay-tcp, SRV _btmm-relay._tcp), e.g. 443; 0: none.
	TLSPort uint16 `toml:"tls_port"`
}

// EtcdConfig is the etcd cluster of store = "etcd".
type EtcdConfig struct {
	Endpoints []string `toml:"endpoints"` // "http://10.0.0.1:2379" or "https://..."
	Prefix    string   `toml:"prefix"`    // key prefix; default "/btmm/"
	// TLS: the CA that signed the etcd servers' certificates, and this
	// client's certificate and key (for client-certificate auth); all
	// optional, https endpoints use the system roots without CAFile.
	CAFile   string `toml:"ca_file"`
	CertFile string `toml:"cert_file"`
	KeyFile  string `toml:"key_file"`
	// DialTimeout (5s) bounds connecting; RequestTimeout (5s) bounds one
	// update's transaction; SessionTTL (5s) is how long a dead replica
	// stays listed and how long the lease expirer election survives it.
	DialTimeout    Duration `toml:"dial_timeout"`
	RequestTimeout Duration `toml:"request_timeout"`
	SessionTTL     Duration `toml:"session_ttl"`
}

// LeaseConfig bounds update leases (RFC 9664).
type LeaseConfig struct {
	Min     Duration `toml:"min"`     // default 30m
	Max     Duration `toml:"max"`     // default 2h
	Default Duration `toml:"default"` // for updates without the option; default 2h; "0s" never expires
	// NoDefault makes updates without the option permanent.
	Permanent bool `toml:"permanent_without_option"`
}

// LLQConfig tunes Long-Lived Queries (RFC 8764).
type LLQConfig struct {
	MinLease      Duration `toml:"min_lease"`     // default 15m
	MaxLease      Duration `toml:"max_lease"`     // default 2h
	Retransmit    Duration `toml:"retransmit"`    // first event retransmission; default 2s
	Transmissions int      `toml:"transmissions"` // default 3
	MaxPerKey     int      `toml:"max_per_key"`   // default 256
	MaxTotal      int      `toml:"max_total"`     // default 200000
}

// Limits are abuse limits.
type Limits struct {
	UpdatesPerSecond float64 `toml:"updates_per_second"` // per key; default 50
	UpdateBurst      int     `toml:"update_burst"`       // default 100
	MaxMessageSize   int     `toml:"max_message_size"`   // TCP/TLS message; default 16384
	MaxUpdateRecords int     `toml:"max_update_records"` // prerequisite+update RRs; default 128
	MaxConns         int     `toml:"max_conns"`          // TCP+TLS connections; default 10000
	// MaxConnsPerClient caps the TCP+TLS connections of one client: one
	// IPv4 address, or one IPv6 /64 (a host's privacy addresses and a
	// site's hosts share it). Default 64.
	MaxConnsPerClient int `toml:"max_conns_per_client"`
	// TLSHandshakeTimeout bounds a DNS-over-TLS handshake. Default 5s.
	TLSHandshakeTimeout Duration `toml:"tls_handshake_timeout"`
	// IdleTimeout closes a TCP/TLS connection that holds no LLQ after this
	// long without a message (RFC 7766 §6.2.3). Default 30s. A connection
	// holding an LLQ may stay silent for its longest granted LLQ lease plus
	// a minute (its client refreshes within the lease).
	IdleTimeout Duration `toml:"idle_timeout"`
}

// Duration is a time.Duration written as "30m" in the config file.
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// LoadConfig reads a TOML config file. Unknown keys are an error.
func LoadConfig(path string) (Config, error) {
	var c Config
	data, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("server: load config: %w", err)
	}
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		return c, fmt.Errorf("server: load config %s: %w", path, err)
	}
	if u := md.Undecoded(); len(u) > 0 {
		return c, fmt.Errorf("server: load config %s: unknown key %q", path, u[0].String())
	}
	return c, nil
}

func (c *Config) setDefaults() error {
	if c.Zone == "" {
		return fmt.Errorf("server: config: zone is required")
	}
	if c.DataDir == "" {
		return fmt.Errorf("server: config: data_dir is required")
	}
	def := func(d *Duration, v time.Duration) {
		if *d == 0 {
			*d = Duration(v)
		}
	}
	def(&c.UpdateLease.Min, lease.DefaultBounds.Min)
	def(&c.UpdateLease.Max, lease.DefaultBounds.Max)
	if !c.UpdateLease.Permanent {
		def(&c.UpdateLease.Default, lease.DefaultBounds.Default)
	} else {
		c.UpdateLease.Default = 0
	}
	if err := c.leaseBounds().Validate(); err != nil {
		return fmt.Errorf("server: config: update_lease: %w", err)
	}
	for _, u := range c.AppleCompat {
		if u != "*" && !userRE.MatchString(u) {
			return fmt.Errorf("server: config: apple_compat: %q is not a user name or \"*\"", u)
		}
	}
	def(&c.TSIGFudge, 5*time.Minute)
	if f := time.Duration(c.TSIGFudge); f < time.Second || f > 0xffff*time.Second {
		return fmt.Errorf("server: config: tsig_fudge %v out of range [1s, 65535s]", time.Duration(c.TSIGFudge))
	}
	def(&c.LLQ.MinLease, 15*time.Minute)
	def(&c.LLQ.MaxLease, 2*time.Hour)
	if c.LLQ.MaxLease < c.LLQ.MinLease {
		return fmt.Errorf("server: config: llq: max_lease < min_lease")
	}
	def(&c.LLQ.Retransmit, 2*time.Second)
	if c.Limits.UpdatesPerSecond == 0 {
		c.Limits.UpdatesPerSecond = 50
	}
	if c.Limits.UpdateBurst == 0 {
		c.Limits.UpdateBurst = 100
	}
	if c.Limits.MaxMessageSize == 0 {
		c.Limits.MaxMessageSize = 16384
	}
	if c.Limits.MaxUpdateRecords == 0 {
		c.Limits.MaxUpdateRecords = 128
	}
	if c.Limits.MaxConns == 0 {
		c.Limits.MaxConns = 10000
	}
	if c.Limits.MaxConnsPerClient == 0 {
		c.Limits.MaxConnsPerClient = 64
	}
	def(&c.Limits.TLSHandshakeTimeout, 5*time.Second)
	def(&c.Limits.IdleTimeout, 30*time.Second)
	if c.Limits.MaxConns < 0 || c.Limits.MaxConnsPerClient < 0 || c.Limits.TLSHandshakeTimeout < 0 || c.Limits.IdleTimeout < 0 {
		return fmt.Errorf("server: config: limits: negative value")
	}
	switch c.Store {
	case "", "embedded":
		c.Store = "embedded"
	case "etcd":
		if len(c.Etcd.Endpoints) == 0 {
			return fmt.Errorf("server: config: store = \"etcd\" needs etcd.endpoints")
		}
		if (c.Etcd.CertFile == "") != (c.Etcd.KeyFile == "") {
			return fmt.Errorf("server: config: etcd: cert_file and key_file go together")
		}
		if ttl := time.Duration(c.Etcd.SessionTTL); ttl != 0 && ttl < time.Second {
			return fmt.Errorf("server: config: etcd: session_ttl below 1s")
		}
	default:
		return fmt.Errorf("server: config: store %q: want \"embedded\" or \"etcd\"", c.Store)
	}
	for _, a := range c.ServerAddrs {
		if _, err := netip.ParseAddr(a); err != nil {
			return fmt.Errorf("server: config: server_addrs: %w", err)
		}
	}
	for _, r := range c.Relays {
		for _, a := range r.Addrs {
			if _, err := netip.ParseAddr(a); err != nil {
				return fmt.Errorf("server: config: relay %s: addrs: %w", r.Name, err)
			}
		}
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

func (c *Config) leaseBounds() lease.Bounds {
	return lease.Bounds{Min: time.Duration(c.UpdateLease.Min), Max: time.Duration(c.UpdateLease.Max),
		Default: time.Duration(c.UpdateLease.Default)}
}
