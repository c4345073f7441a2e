// Package identity implements the per-boot host identifier of RFC 6281 §6.3:
// an IPv6 Unique Local Address (RFC 4193) made of the octet 0xfd, seven random
// octets and the IEEE EUI-64 of the primary interface, plus the
// "AutoTunnel-XX-XX-XX-FF-FE-XX-XX-XX" label (RFC 6281 §3) derived from the
// same EUI-64 that names the SRV target of this host.
//
// The RFC keeps the ULA while the machine is on and drops it at power-off.
// Load reproduces that on Linux: the identity is written under /run (a tmpfs
// emptied at boot) together with the kernel's boot ID
// (/proc/sys/kernel/random/boot_id), so restarting the agent keeps the ULA and a
// reboot makes a new one even if the state file survives (e.g. a /run that is
// not a tmpfs).
//
// # EUI-64 and the U/L bit
//
// The EUI-64 is the interface's 48-bit MAC with ff:fe inserted in the middle.
// The U/L bit is left as it is in the MAC, as in the RFC's example (MAC
// 00:22:69:8e:34:xx gives AutoTunnel-00-22-69-FF-FE-8E-34-XX): this is the IEEE
// EUI-64, not the "modified EUI-64" of RFC 4291 appendix A that flips the bit.
//
// # Hosts without a MAC
//
// When no interface has a 48-bit MAC (containers with only tunnels, some VMs),
// the EUI-64 is derived from /etc/machine-id: the first six octets of
// SHA-256("btmm-eui64\x00" || machine-id) with ff:fe inserted, the U/L bit set
// (locally administered, so it can never equal a real universally
// administered EUI-64) and the group bit cleared. Without a machine-id the six
// octets are random (and kept with the rest of the state until reboot).
// Identity.Source says which way the EUI-64 was made.
package identity

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Default paths.
const (
	DefaultStatePath  = "/run/btmm/identity.json"
	DefaultBootIDPath = "/proc/sys/kernel/random/boot_id"
	DefaultMachineID  = "/etc/machine-id"
)

// EUI64 is an IEEE EUI-64 identifier.
type EUI64 [8]byte

// EUI64FromMAC inserts ff:fe in the middle of a 48-bit MAC, leaving the U/L bit
// as it is (RFC 6281 §3's example).
func EUI64FromMAC(mac net.HardwareAddr) (EUI64, error) {
	if len(mac) != 6 {
		return EUI64{}, fmt.Errorf("identity: EUI-64 from MAC %q: want a 48-bit MAC, got %d bytes", mac.String(), len(mac))
	}
	if bytes.Equal(mac, make([]byte, 6)) {
		return EUI64{}, errors.New("identity: EUI-64 from MAC: all-zero MAC")
	}
	return EUI64{mac[0], mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]}, nil
}

// Label returns the AutoTunnel label for e, e.g.
// "AutoTunnel-00-22-69-FF-FE-8E-34-5C" (RFC 6281 §3).
func (e EUI64) Label() string {
	var b strings.Builder
	b.WriteString("AutoTunnel")
	for _, o := range e {
		fmt.Fprintf(&b, "-%02X", o)
	}
	return b.String()
}

func (e EUI64) String() string {
	var parts [8]string
	for i, o := range e {
		parts[i] = fmt.Sprintf("%02x", o)
	}
	return strings.Join(parts[:], ":")
}

// ParseLabel is the inverse of Label (case-insensitive).
func ParseLabel(label string) (EUI64, error) {
	var e EUI64
	rest, ok := strings.CutPrefix(strings.ToLower(label), "autotunnel-")
	if !ok {
		return e, fmt.Errorf("identity: parse label %q: no AutoTunnel- prefix", label)
	}
	parts := strings.Split(rest, "-")
	if len(parts) != 8 {
		return e, fmt.Errorf("identity: parse label %q: want 8 octets, got %d", label, len(parts))
	}
	for i, p := range parts {
		b, err := hex.DecodeString(p)
		if err != nil || len(b) != 1 {
			return e, fmt.Errorf("identity: parse label %q: octet %d %q is not two hex digits", label, i, p)
		}
		e[i] = b[0]
	}
	return e, nil
}

// NewULA makes fd + 7 random octets + eui (RFC 6281 §6.3).
func NewULA(random io.Reader, eui EUI64) (netip.Addr, error) {
	var a [16]byte
	a[0] = 0xfd
	if _, err := io.ReadFull(random, a[1:8]); err != nil {
		return netip.Addr{}, fmt.Errorf("identity: random ULA bits: %w", err)
	}
	copy(a[8:], eui[:])
	return netip.AddrFrom16(a), nil
}

// FallbackEUI64 derives an EUI-64 for a host without a MAC from its machine
// ID (see the package comment). An empty machineID uses random octets.
func FallbackEUI64(machineID string, random io.Reader) (EUI64, error) {
	var six [6]byte
	if id := strings.TrimSpace(machineID); id != "" {
		sum := sha256.Sum256(append([]byte("btmm-eui64\x00"), id...))
		copy(six[:], sum[:6])
	} else if _, err := io.ReadFull(random, six[:]); err != nil {
		return EUI64{}, fmt.Errorf("identity: random fallback EUI-64: %w", err)
	}
	six[0] = six[0]&^0x01 | 0x02 // unicast, locally administered
	return EUI64{six[0], six[1], six[2], 0xff, 0xfe, six[3], six[4], six[5]}, nil
}

// Identity is this host's identifier for the current boot.
type Identity struct {
	ULA    netip.Addr `json:"ula"`
	EUI64  EUI64      `json:"eui64"`
	BootID string     `json:"boot_id"`
	// Source is "mac:<ifname>", "machine-id" or "random".
	Source string `json:"source"`
}

// Label is the AutoTunnel label of the identity's EUI-64.
func (id Identity) Label() string { return id.EUI64.Label() }

// Config says where Load finds and keeps things. Zero fields take defaults.
type Config struct {
	StatePath     string // default DefaultStatePath
	BootIDPath    string // default DefaultBootIDPath
	MachineIDPath string // default DefaultMachineID
	// Interface names the primary interface. Empty picks the interface of
	// the IPv4 default route, else the lowest-index up interface with a
	// 48-bit MAC.
	Interface string
	// Interfaces lists the host's interfaces; nil uses net.Interfaces.
	Interfaces func() ([]net.Interface, error)
	// DefaultRouteIface names the default route's interface; nil reads
	// /proc/net/route.
	DefaultRouteIface func() string
	Rand              io.Reader // default crypto/rand.Reader
}

func (c *Config) defaults() {
	if c.StatePath == "" {
		c.StatePath = DefaultStatePath
	}
	if c.BootIDPath == "" {
		c.BootIDPath = DefaultBootIDPath
	}
	if c.MachineIDPath == "" {
		c.MachineIDPath = DefaultMachineID
	}
	if c.Interfaces == nil {
		c.Interfaces = net.Interfaces
	}
	if c.DefaultRouteIface == nil {
		c.DefaultRouteIface = procDefaultRouteIface
	}
	if c.Rand == nil {
		c.Rand = rand.Reader
	}
}

// Load returns this boot's identity: the one in the state file when it was
// written during this boot, else a new one, which it writes (atomically,
// mode 0644: the ULA is not a secret) before returning.
func Load(cfg Config) (Identity, error) {
	cfg.defaults()
	raw, err := os.ReadFile(cfg.BootIDPath)
	if err != nil {
		return Identity{}, fmt.Errorf("identity: read boot id: %w", err)
	}
	bootID := strings.TrimSpace(string(raw))
	if bootID == "" {
		return Identity{}, fmt.Errorf("identity: read boot id: %s is empty", cfg.BootIDPath)
	}
	// A missing or corrupt state file, or one from an earlier boot, is
	// replaced: a fresh identity is always safe (a reboot makes one anyway).
	if old, err := readState(cfg.StatePath); err == nil && old.BootID == bootID {
		return old, nil
	}
	eui, source, err := primaryEUI64(&cfg)
	if err != nil {
		return Identity{}, err
	}
	ula, err := NewULA(cfg.Rand, eui)
	if err != nil {
		return Identity{}, err
	}
	id := Identity{ULA: ula, EUI64: eui, BootID: bootID, Source: source}
	if err := writeState(cfg.StatePath, id); err != nil {
		return Identity{}, err
	}
	return id, nil
}

func readState(path string) (Identity, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return Identity{}, err
	}
	var id Identity
	if err := json.Unmarshal(raw, &id); err != nil {
		return Identity{}, fmt.Errorf("identity: parse %s: %w", path, err)
	}
	if err := id.validate(); err != nil {
		return Identity{}, fmt.Errorf("identity: parse %s: %w", path, err)
	}
	return id, nil
}

// ULAPrefix is RFC 4193's block of Unique Local Addresses, fc00::/7 (an
// identity is always in its locally assigned half, fd00::/8).
var ULAPrefix = netip.MustParsePrefix("fc00::/7")

// IsULA reports whether a is an IPv6 Unique Local Address (fc00::/7; not an
// IPv4 address, not zoned). Every package that tells ULAs apart uses it.
func IsULA(a netip.Addr) bool { return a.Is6() && ULAPrefix.Contains(a) }

func (id Identity) validate() error {
	if !id.ULA.Is6() || id.ULA.As16()[0] != 0xfd {
		return fmt.Errorf("ULA %v is not in fd00::/8", id.ULA)
	}
	u := id.ULA.As16()
	if !bytes.Equal(u[8:], id.EUI64[:]) {
		return fmt.Errorf("ULA %v does not end in EUI-64 %v", id.ULA, id.EUI64)
	}
	if id.BootID == "" {
		return errors.New("no boot id")
	}
	return nil
}

func writeState(path string, id Identity) error {
	data, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return fmt.Errorf("identity: encode state: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("identity: write state: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".identity-*")
	if err != nil {
		return fmt.Errorf("identity: write state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("identity: write state: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("identity: write state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("identity: write state: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("identity: write state: %w", err)
	}
	return nil
}

// MarshalText renders the EUI-64 as colon-separated hex.
func (e EUI64) MarshalText() ([]byte, error) { return []byte(e.String()), nil }

// UnmarshalText parses colon-separated hex.
func (e *EUI64) UnmarshalText(b []byte) error {
	parts := strings.Split(string(b), ":")
	if len(parts) != 8 {
		return fmt.Errorf("EUI-64 %q: want 8 octets", b)
	}
	for i, p := range parts {
		o, err := hex.DecodeString(p)
		if err != nil || len(o) != 1 {
			return fmt.Errorf("EUI-64 %q: bad octet %q", b, p)
		}
		e[i] = o[0]
	}
	return nil
}

func primaryEUI64(cfg *Config) (EUI64, string, error) {
	ifs, err := cfg.Interfaces()
	if err != nil {
		return EUI64{}, "", fmt.Errorf("identity: list interfaces: %w", err)
	}
	usable := func(ifi net.Interface) bool {
		return ifi.Flags&net.FlagLoopback == 0 && len(ifi.HardwareAddr) == 6 && !bytes.Equal(ifi.HardwareAddr, make([]byte, 6))
	}
	if cfg.Interface != "" {
		for _, ifi := range ifs {
			if ifi.Name == cfg.Interface {
				eui, err := EUI64FromMAC(ifi.HardwareAddr)
				if err != nil {
					return EUI64{}, "", fmt.Errorf("identity: primary interface %s: %w", ifi.Name, err)
				}
				return eui, "mac:" + ifi.Name, nil
			}
		}
		return EUI64{}, "", fmt.Errorf("identity: primary interface %q not found", cfg.Interface)
	}
	if name := cfg.DefaultRouteIface(); name != "" {
		for _, ifi := range ifs {
			if ifi.Name == name && usable(ifi) {
				eui, _ := EUI64FromMAC(ifi.HardwareAddr)
				return eui, "mac:" + ifi.Name, nil
			}
		}
	}
	sort.Slice(ifs, func(i, j int) bool { return ifs[i].Index < ifs[j].Index })
	for _, up := range []bool{true, false} {
		for _, ifi := range ifs {
			if usable(ifi) && (!up || ifi.Flags&net.FlagUp != 0) {
				eui, _ := EUI64FromMAC(ifi.HardwareAddr)
				return eui, "mac:" + ifi.Name, nil
			}
		}
	}
	mid, err := os.ReadFile(cfg.MachineIDPath)
	if err == nil && strings.TrimSpace(string(mid)) != "" {
		eui, err := FallbackEUI64(string(mid), cfg.Rand)
		return eui, "machine-id", err
	}
	eui, err := FallbackEUI64("", cfg.Rand)
	return eui, "random", err
}

// procDefaultRouteIface returns the interface of the IPv4 default route from
// /proc/net/route, or "".
func procDefaultRouteIface() string {
	raw, err := os.ReadFile("/proc/net/route")
	if err != nil {
		return ""
	}
	return defaultRouteIface(string(raw))
}

func defaultRouteIface(table string) string {
	for i, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 8 {
			continue
		}
		// Iface Destination Gateway Flags RefCnt Use Metric Mask
		if f[1] == "00000000" && f[7] == "00000000" {
			return f[0]
		}
	}
	return ""
}
