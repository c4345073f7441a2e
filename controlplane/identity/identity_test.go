package identity

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEUI64FromMACKeepsULBit(t *testing.T) {
	// RFC 6281 §3's example: MAC 00:22:69:8e:34:xx.
	mac, _ := net.ParseMAC("00:22:69:8e:34:5c")
	eui, err := EUI64FromMAC(mac)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := eui.Label(), "AutoTunnel-00-22-69-FF-FE-8E-34-5C"; got != want {
		t.Errorf("Label = %q, want %q", got, want)
	}
	back, err := ParseLabel(eui.Label())
	if err != nil || back != eui {
		t.Errorf("ParseLabel(%q) = %v, %v; want %v", eui.Label(), back, err, eui)
	}
	for _, bad := range []string{"00:11:22:33:44", "00:00:00:00:00:00", "00:11:22:33:44:55:66:77"} {
		m, _ := net.ParseMAC(bad)
		if m == nil {
			m = net.HardwareAddr{0, 0, 0, 0, 0}
		}
		if _, err := EUI64FromMAC(m); err == nil {
			t.Errorf("EUI64FromMAC(%v) succeeded, want error", bad)
		}
	}
}

func TestParseLabelErrors(t *testing.T) {
	for _, s := range []string{"", "AutoTunnel", "Tunnel-00-22-69-FF-FE-8E-34-5C", "AutoTunnel-00-22-69-FF-FE-8E-34", "AutoTunnel-00-22-69-FF-FE-8E-34-5G", "AutoTunnel-00-22-69-FF-FE-8E-34-123"} {
		if _, err := ParseLabel(s); err == nil {
			t.Errorf("ParseLabel(%q) succeeded", s)
		}
	}
}

func TestNewULA(t *testing.T) {
	eui := EUI64{0x00, 0x22, 0x69, 0xff, 0xfe, 0x8e, 0x34, 0x5c}
	ula, err := NewULA(bytes.NewReader([]byte{1, 2, 3, 4, 5, 6, 7}), eui)
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.MustParseAddr("fd01:203:405:607:22:69ff:fe8e:345c"); ula != want {
		t.Errorf("ULA = %v, want %v", ula, want)
	}
	if _, err := NewULA(bytes.NewReader([]byte{1, 2}), eui); err == nil {
		t.Error("NewULA with a short random source succeeded")
	}
}

func TestFallbackEUI64(t *testing.T) {
	a, _ := FallbackEUI64("0123456789abcdef0123456789abcdef\n", nil)
	b, _ := FallbackEUI64("0123456789abcdef0123456789abcdef", nil)
	if a != b {
		t.Errorf("machine-id fallback not stable: %v vs %v", a, b)
	}
	if a[0]&0x02 == 0 || a[0]&0x01 != 0 || a[3] != 0xff || a[4] != 0xfe {
		t.Errorf("fallback %v: want U/L bit set, group bit clear, ff:fe in the middle", a)
	}
	r, err := FallbackEUI64("", bytes.NewReader([]byte{0xff, 1, 2, 3, 4, 5}))
	if err != nil || r != (EUI64{0xfe, 1, 2, 0xff, 0xfe, 3, 4, 5}) {
		t.Errorf("random fallback = %v, %v", r, err)
	}
}

type fakeHost struct {
	dir    string
	bootID string
	cfg    Config
}

func newFakeHost(t *testing.T, ifs []net.Interface, defRoute string) *fakeHost {
	dir := t.TempDir()
	h := &fakeHost{dir: dir}
	h.cfg = Config{
		StatePath:         filepath.Join(dir, "run", "btmm", "identity.json"),
		BootIDPath:        filepath.Join(dir, "boot_id"),
		MachineIDPath:     filepath.Join(dir, "machine-id"),
		Interfaces:        func() ([]net.Interface, error) { return ifs, nil },
		DefaultRouteIface: func() string { return defRoute },
	}
	h.boot(t)
	return h
}

func (h *fakeHost) boot(t *testing.T) {
	h.bootID = h.bootID + "x"
	if err := os.WriteFile(h.cfg.BootIDPath, []byte("boot-"+h.bootID+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func mustMAC(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }

func TestLoadKeepsIdentityUntilReboot(t *testing.T) {
	ifs := []net.Interface{
		{Index: 1, Name: "lo", Flags: net.FlagUp | net.FlagLoopback},
		{Index: 2, Name: "eth0", Flags: net.FlagUp, HardwareAddr: mustMAC("52:54:00:12:34:56")},
		{Index: 3, Name: "wlan0", Flags: net.FlagUp, HardwareAddr: mustMAC("00:22:69:8e:34:5c")},
	}
	h := newFakeHost(t, ifs, "wlan0")
	first, err := Load(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if first.Source != "mac:wlan0" || first.Label() != "AutoTunnel-00-22-69-FF-FE-8E-34-5C" {
		t.Errorf("first = %+v (label %s), want wlan0's EUI-64 (default route)", first, first.Label())
	}
	if first.ULA.As16()[0] != 0xfd || !strings.HasSuffix(first.ULA.String(), ":22:69ff:fe8e:345c") {
		t.Errorf("ULA %v: want fd00::/8 ending in the EUI-64", first.ULA)
	}
	// Agent restart: same boot, same identity.
	again, err := Load(h.cfg)
	if err != nil || again != first {
		t.Errorf("restart: got %+v, %v; want %+v", again, err, first)
	}
	// Reboot (state file survived because /run was not a tmpfs): new ULA.
	h.boot(t)
	rebooted, err := Load(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if rebooted.ULA == first.ULA || rebooted.EUI64 != first.EUI64 {
		t.Errorf("reboot: got %v (eui %v), want a new ULA with the same EUI-64 %v", rebooted.ULA, rebooted.EUI64, first.EUI64)
	}
	// Corrupt state is replaced, not trusted.
	if err := os.WriteFile(h.cfg.StatePath, []byte("{garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	fresh, err := Load(h.cfg)
	if err != nil || fresh.ULA == rebooted.ULA {
		t.Errorf("after corrupt state: %+v, %v; want a fresh identity", fresh, err)
	}
	st, err := os.Stat(h.cfg.StatePath)
	if err != nil || st.Mode().Perm() != 0o644 {
		t.Errorf("state file mode = %v, %v", st.Mode(), err)
	}
}

func TestLoadPicksInterface(t *testing.T) {
	ifs := []net.Interface{
		{Index: 5, Name: "tun0", Flags: net.FlagUp},
		{Index: 4, Name: "eth1", HardwareAddr: mustMAC("02:00:00:00:00:01")}, // down
		{Index: 3, Name: "eth0", Flags: net.FlagUp, HardwareAddr: mustMAC("52:54:00:12:34:56")},
	}
	h := newFakeHost(t, ifs, "tun0") // default route via a MAC-less tunnel
	id, err := Load(h.cfg)
	if err != nil || id.Source != "mac:eth0" {
		t.Errorf("got %+v, %v; want the lowest-index up interface with a MAC (eth0)", id, err)
	}
	h2 := newFakeHost(t, ifs, "")
	h2.cfg.Interface = "eth1"
	id, err = Load(h2.cfg)
	if err != nil || id.Label() != "AutoTunnel-02-00-00-FF-FE-00-00-01" {
		t.Errorf("configured eth1: %+v, %v", id, err)
	}
	h3 := newFakeHost(t, ifs, "")
	h3.cfg.Interface = "nope0"
	if _, err := Load(h3.cfg); err == nil || !strings.Contains(err.Error(), "nope0") {
		t.Errorf("missing configured interface: err = %v", err)
	}
	if _, err := os.Stat(h3.cfg.StatePath); !os.IsNotExist(err) {
		t.Errorf("failed Load wrote state: %v", err)
	}
}

func TestLoadWithoutMAC(t *testing.T) {
	ifs := []net.Interface{{Index: 1, Name: "lo", Flags: net.FlagUp | net.FlagLoopback}}
	h := newFakeHost(t, ifs, "")
	if err := os.WriteFile(h.cfg.MachineIDPath, []byte("0123456789abcdef0123456789abcdef\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	id, err := Load(h.cfg)
	if err != nil || id.Source != "machine-id" {
		t.Fatalf("got %+v, %v", id, err)
	}
	want, _ := FallbackEUI64("0123456789abcdef0123456789abcdef", nil)
	if id.EUI64 != want {
		t.Errorf("EUI-64 %v, want %v", id.EUI64, want)
	}
	h2 := newFakeHost(t, ifs, "")
	id, err = Load(h2.cfg)
	if err != nil || id.Source != "random" || id.EUI64[0]&0x02 == 0 {
		t.Errorf("no machine-id: %+v, %v", id, err)
	}
}

func TestLoadNeedsBootID(t *testing.T) {
	h := newFakeHost(t, nil, "")
	os.Remove(h.cfg.BootIDPath)
	if _, err := Load(h.cfg); err == nil || !strings.Contains(err.Error(), "boot id") {
		t.Errorf("err = %v, want a boot id error", err)
	}
}

func TestDefaultRouteIface(t *testing.T) {
	table := "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n" +
		"eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n" +
		"wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
	if got := defaultRouteIface(table); got != "wlan0" {
		t.Errorf("got %q, want wlan0", got)
	}
	if got := defaultRouteIface("Iface\n"); got != "" {
		t.Errorf("empty table: %q", got)
	}
}

// FuzzParseLabel: parse -> Label -> parse.
func FuzzParseLabel(f *testing.F) {
	f.Add("AutoTunnel-00-22-69-FF-FE-8E-34-5C")
	f.Add("autotunnel-02-00-00-ff-fe-00-00-01")
	f.Add("AutoTunnel-")
	f.Fuzz(func(t *testing.T, s string) {
		e, err := ParseLabel(s)
		if err != nil {
			return
		}
		e2, err := ParseLabel(e.Label())
		if err != nil || e2 != e {
			t.Fatalf("round trip %q -> %q -> %v, %v", s, e.Label(), e2, err)
		}
	})
}
