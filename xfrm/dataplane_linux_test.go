package xfrm

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/btmm/btmm/controlplane"
)

var (
	ulaA = netip.MustParseAddr("fd00::a")
	ulaB = netip.MustParseAddr("fd00::b")
	ulaC = netip.MustParseAddr("fd00::c")
)

func gcm(spi uint32) controlplane.SA {
	return controlplane.SA{SPI: spi, Cipher: controlplane.CipherAESGCM, Key: bytes.Repeat([]byte{byte(spi)}, 20)}
}

func cbc(spi uint32) controlplane.SA {
	return controlplane.SA{SPI: spi, Cipher: controlplane.CipherAESCBCHMAC, Key: bytes.Repeat([]byte{byte(spi)}, 48)}
}

func peer(name string, ula netip.Addr, outer string, out, in controlplane.SA, prev ...controlplane.SA) controlplane.Peer {
	return controlplane.Peer{Name: name, ULA: ula, Outer: netip.MustParseAddrPort(outer), Out: out, In: in, PrevIn: prev}
}

func stateOf(peers ...controlplane.Peer) *controlplane.State {
	return &controlplane.State{Local: controlplane.Local{ULA: ulaA, Port: 4500, Outer: netip.MustParseAddr("10.0.0.1")}, Peers: peers}
}

func newFake(t *testing.T, k *fakeKernel, cfg Config) *Dataplane {
	t.Helper()
	var mig migrator = k
	d, err := newDataplane(k, mig, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func mustRender(t *testing.T, h handle) string {
	t.Helper()
	s, err := render(h, "btmm0")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// setSteps is applied in order; each want is the whole rendered kernel.
var setSteps = []struct {
	name string
	in   *controlplane.State
	want string
}{
	{
		name: "no peers",
		in:   stateOf(),
		want: `
addr fd00::a/128 dev btmm0
link btmm0 xfrm if_id 0x6281 up
`,
	},
	{
		name: "one peer",
		in:   stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002))),
		want: `
addr fd00::a/128 dev btmm0
link btmm0 xfrm if_id 0x6281 up
policy dir fwd fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.0.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.0.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::b/128 if_id 0x6281 tmpl 10.0.0.1 -> 10.0.0.2 esp tunnel reqid 0x6281
route fd00::b/128 dev btmm0 src fd00::a proto 98 mtu 1438
state 10.0.0.1:4500 -> 10.0.0.2:4500 spi 0x00001001 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::b/128
state 10.0.0.2:4500 -> 10.0.0.1:4500 spi 0x00001002 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
`,
	},
	{
		name: "second peer with cbc+hmac behind a NAT port",
		in: stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)),
			peer("c", ulaC, "11.0.0.9:61000", cbc(0x2001), cbc(0x2002))),
		want: `
addr fd00::a/128 dev btmm0
link btmm0 xfrm if_id 0x6281 up
policy dir fwd fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.0.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir fwd fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.0.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::b/128 if_id 0x6281 tmpl 10.0.0.1 -> 10.0.0.2 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::c/128 if_id 0x6281 tmpl 10.0.0.1 -> 11.0.0.9 esp tunnel reqid 0x6281
route fd00::b/128 dev btmm0 src fd00::a proto 98 mtu 1438
route fd00::c/128 dev btmm0 src fd00::a proto 98 mtu 1422
state 10.0.0.1:4500 -> 10.0.0.2:4500 spi 0x00001001 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::b/128
state 10.0.0.1:4500 -> 11.0.0.9:61000 spi 0x00002001 esp tunnel reqid 0x6281 if_id 0x6281 enc cbc(aes) key[16] auth hmac(sha256) key[32] trunc 128 replay-window 32 sel fd00::a/128 -> fd00::c/128
state 10.0.0.2:4500 -> 10.0.0.1:4500 spi 0x00001002 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
state 11.0.0.9:61000 -> 10.0.0.1:4500 spi 0x00002002 esp tunnel reqid 0x6281 if_id 0x6281 enc cbc(aes) key[16] auth hmac(sha256) key[32] trunc 128 replay-window 32 sel fd00::c/128 -> fd00::a/128
`,
	},
	{
		name: "c's NAT port and b's address change; b rekeyed with the old inbound SA kept",
		in: stateOf(peer("b", ulaB, "10.0.1.2:4500", gcm(0x1011), gcm(0x1012), gcm(0x1002)),
			peer("c", ulaC, "11.0.0.9:61001", cbc(0x2001), cbc(0x2002))),
		want: `
addr fd00::a/128 dev btmm0
link btmm0 xfrm if_id 0x6281 up
policy dir fwd fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.1.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir fwd fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::b/128 -> fd00::a/128 if_id 0x6281 tmpl 10.0.1.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::b/128 if_id 0x6281 tmpl 10.0.0.1 -> 10.0.1.2 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::c/128 if_id 0x6281 tmpl 10.0.0.1 -> 11.0.0.9 esp tunnel reqid 0x6281
route fd00::b/128 dev btmm0 src fd00::a proto 98 mtu 1438
route fd00::c/128 dev btmm0 src fd00::a proto 98 mtu 1422
state 10.0.0.1:4500 -> 10.0.1.2:4500 spi 0x00001011 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::b/128
state 10.0.0.1:4500 -> 11.0.0.9:61001 spi 0x00002001 esp tunnel reqid 0x6281 if_id 0x6281 enc cbc(aes) key[16] auth hmac(sha256) key[32] trunc 128 replay-window 32 sel fd00::a/128 -> fd00::c/128
state 10.0.1.2:4500 -> 10.0.0.1:4500 spi 0x00001002 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
state 10.0.1.2:4500 -> 10.0.0.1:4500 spi 0x00001012 esp tunnel reqid 0x6281 if_id 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
state 11.0.0.9:61001 -> 10.0.0.1:4500 spi 0x00002002 esp tunnel reqid 0x6281 if_id 0x6281 enc cbc(aes) key[16] auth hmac(sha256) key[32] trunc 128 replay-window 32 sel fd00::c/128 -> fd00::a/128
`,
	},
	{
		name: "b gone, c only",
		in:   stateOf(peer("c", ulaC, "11.0.0.9:61001", cbc(0x2001), cbc(0x2002))),
		want: `
addr fd00::a/128 dev btmm0
link btmm0 xfrm if_id 0x6281 up
policy dir fwd fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::c/128 -> fd00::a/128 if_id 0x6281 tmpl 11.0.0.9 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::c/128 if_id 0x6281 tmpl 10.0.0.1 -> 11.0.0.9 esp tunnel reqid 0x6281
route fd00::c/128 dev btmm0 src fd00::a proto 98 mtu 1422
state 10.0.0.1:4500 -> 11.0.0.9:61001 spi 0x00002001 esp tunnel reqid 0x6281 if_id 0x6281 enc cbc(aes) key[16] auth hmac(sha256) key[32] trunc 128 replay-window 32 sel fd00::a/128 -> fd00::c/128
state 11.0.0.9:61001 -> 10.0.0.1:4500 spi 0x00002002 esp tunnel reqid 0x6281 if_id 0x6281 enc cbc(aes) key[16] auth hmac(sha256) key[32] trunc 128 replay-window 32 sel fd00::c/128 -> fd00::a/128
`,
	},
	{
		name: "everything gone",
		in:   stateOf(),
		want: `
addr fd00::a/128 dev btmm0
link btmm0 xfrm if_id 0x6281 up
`,
	},
}

func TestSetTable(t *testing.T) {
	for _, mode := range []struct {
		name      string
		noMigrate bool
	}{{"migrate", false}, {"re-add", true}} {
		t.Run(mode.name, func(t *testing.T) {
			k := newFakeKernel()
			k.noMigrate = mode.noMigrate
			d := newFake(t, k, Config{OutboundGrace: -1}) // the table tests the diff; TestRekeyRetiresOutboundAfterGrace the grace
			for _, step := range setSteps {
				if _, err := d.Set(context.Background(), step.in); err != nil {
					t.Fatalf("%s: Set: %v", step.name, err)
				}
				if diff := cmp.Diff(strings.TrimPrefix(step.want, "\n"), mustRender(t, k)); diff != "" {
					t.Fatalf("%s: kernel (-want +got):\n%s", step.name, diff)
				}
				// Idempotent: the same state again changes nothing.
				if ch, err := d.Set(context.Background(), step.in); err != nil || len(ch) != 0 {
					t.Fatalf("%s: second Set = %v, %v; want no changes", step.name, ch, err)
				}
			}
			if !mode.noMigrate && k.migrated == 0 {
				t.Error("no SA was moved with XFRM_MSG_MIGRATE")
			}
		})
	}
}

// TestSetRandomOrder replays the table in random orders: from any earlier
// state, Set converges to the same kernel picture.
func TestSetRandomOrder(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 20 {
		k := newFakeKernel()
		k.noMigrate = round%2 == 1
		d := newFake(t, k, Config{OutboundGrace: -1})
		for _, i := range r.Perm(len(setSteps)) {
			step := setSteps[i]
			if _, err := d.Set(context.Background(), step.in); err != nil {
				t.Fatalf("round %d %s: Set: %v", round, step.name, err)
			}
			if diff := cmp.Diff(strings.TrimPrefix(step.want, "\n"), mustRender(t, k)); diff != "" {
				t.Fatalf("round %d %s: kernel (-want +got):\n%s", round, step.name, diff)
			}
		}
	}
}

func changeStrings(ch []controlplane.Change) []string {
	var s []string
	for _, c := range ch {
		s = append(s, c.String())
	}
	return s
}

// TestMoveKeepsSequenceNumbers: an outer address change moves both SAs
// without rekeying, keeping the replay state (sequence numbers), through
// XFRM_MSG_MIGRATE or, without it, by re-adding with the replay state.
func TestMoveKeepsSequenceNumbers(t *testing.T) {
	for _, tc := range []struct {
		name      string
		noMigrate bool
		outer     string
		wantOSeq  uint32
		wantHow   string
	}{
		{"migrate address", false, "10.0.1.2:4500", 1000, "(migrate)"},
		{"migrate port", false, "10.0.0.2:4600", 1000, "(migrate)"},
		{"re-add address", true, "10.0.1.2:4500", 1128, "(re-added with replay state)"},
		{"update port", true, "10.0.0.2:4600", 1000, "(encap updated)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newFakeKernel()
			k.noMigrate = tc.noMigrate
			d := newFake(t, k, Config{})
			if _, err := d.Set(context.Background(), stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))); err != nil {
				t.Fatal(err)
			}
			for i := range k.states {
				k.states[i].Replay = &netlink.XfrmReplayState{OSeq: 1000, Seq: 2000, BitMap: 0xff}
			}
			ch, err := d.Set(context.Background(), stateOf(peer("b", ulaB, tc.outer, gcm(0x1001), gcm(0x1002))))
			if err != nil {
				t.Fatal(err)
			}
			moves := 0
			for _, c := range ch {
				if c.Op == "move" {
					moves++
					if !strings.HasSuffix(c.What, tc.wantHow) {
						t.Errorf("move %q, want it done %s", c.What, tc.wantHow)
					}
				}
			}
			if moves != 2 {
				t.Errorf("changes %q: want 2 moves", changeStrings(ch))
			}
			for _, s := range k.states {
				if s.Spi == 0x1001 && s.Replay.OSeq != tc.wantOSeq {
					t.Errorf("out SA oseq = %d, want %d", s.Replay.OSeq, tc.wantOSeq)
				}
				if s.Spi == 0x1002 && (s.Replay.Seq != 2000 || s.Replay.BitMap != 0xff) {
					t.Errorf("in SA replay = %+v, want seq 2000 bitmap 0xff", *s.Replay)
				}
			}
			st, err := d.Stats(context.Background())
			if err != nil || len(st) != 1 || st[0].LastOuterChange.IsZero() {
				t.Errorf("Stats = %+v, %v; want the move recorded", st, err)
			}
		})
	}
}

func TestForeignObjectsAndLeftovers(t *testing.T) {
	k := newFakeKernel()
	foreignState := netlink.XfrmState{Src: net.ParseIP("192.0.2.1"), Dst: net.ParseIP("192.0.2.2"), Proto: netlink.XFRM_PROTO_ESP,
		Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x9999, Reqid: 7, Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: make([]byte, 20), ICVLen: 128}}
	foreignPolicy := netlink.XfrmPolicy{Dir: netlink.XFRM_DIR_OUT, Src: prefix128(ulaA), Dst: prefix128(ulaB),
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: net.ParseIP("192.0.2.1"), Dst: net.ParseIP("192.0.2.2"), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 7}}}
	foreignRoute := netlink.Route{Dst: prefix128(netip.MustParseAddr("fd99::1")), LinkIndex: 2, Protocol: 4, Table: 254}
	k.XfrmStateAdd(&foreignState)
	k.XfrmPolicyAdd(&foreignPolicy)
	k.RouteAdd(&foreignRoute)
	foreign := mustRender(t, k)

	// A crashed earlier run left objects with our tags behind.
	d := newFake(t, k, Config{})
	if _, err := d.Set(context.Background(), stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))); err != nil {
		t.Fatal(err)
	}
	d2, err := newDataplane(k, k, Config{})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(foreign, withoutLink(mustRender(t, k))); diff != "" {
		t.Fatalf("start did not remove exactly our leftovers (-want +got):\n%s", diff)
	}
	if _, err := d2.Set(context.Background(), stateOf(peer("c", ulaC, "10.0.0.3:4500", gcm(0x3001), gcm(0x3002)))); err != nil {
		t.Fatal(err)
	}
	if err := d2.Close(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(foreign, mustRender(t, k)); diff != "" {
		t.Fatalf("Close did not remove exactly our objects (-want +got):\n%s", diff)
	}
	if _, err := d2.Set(context.Background(), stateOf()); err == nil {
		t.Error("Set after Close succeeded")
	}
	if _, ok := <-d2.Events(); ok {
		t.Error("Events not closed by Close")
	}
}

func TestForeignInterfaceRefused(t *testing.T) {
	k := newFakeKernel()
	k.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "btmm0"}})
	if _, err := newDataplane(k, k, Config{}); err == nil {
		t.Fatal("took over a foreign interface named btmm0")
	}
}

func TestInvalidInputChangesNothing(t *testing.T) {
	k := newFakeKernel()
	d := newFake(t, k, Config{})
	if _, err := d.Set(context.Background(), stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))); err != nil {
		t.Fatal(err)
	}
	before := mustRender(t, k)
	bad := []*controlplane.State{
		nil,
		stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1001))),                                   // SPI twice
		stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), controlplane.SA{SPI: 0x1002, Cipher: "rot13"})), // cipher
		stateOf(peer("b", netip.MustParseAddr("2001:db8::1"), "10.0.0.2:4500", gcm(0x1001), gcm(0x1002))),     // not a ULA
		stateOf(peer("b", ulaB, "[2001:db8::1]:4500", gcm(0x1001), gcm(0x1002))),                              // outer not IPv4
	}
	for i, s := range bad {
		ch, err := d.Set(context.Background(), s)
		if err == nil || len(ch) != 0 {
			t.Errorf("bad state %d: Set = %v, %v; want an error and no changes", i, ch, err)
		}
	}
	if diff := cmp.Diff(before, mustRender(t, k)); diff != "" {
		t.Errorf("invalid input changed the kernel (-before +after):\n%s", diff)
	}
}

// TestKeysNeverPrinted: changes, errors and renderings carry no key bytes.
func TestKeysNeverPrinted(t *testing.T) {
	k := newFakeKernel()
	k.failSPI = 0x2002
	d := newFake(t, k, Config{})
	secret := controlplane.SA{SPI: 0x2001, Cipher: controlplane.CipherAESGCM, Key: []byte("SECRETSECRETSECRET!!")}
	secret2 := controlplane.SA{SPI: 0x2002, Cipher: controlplane.CipherAESGCM, Key: []byte("HIDDENHIDDENHIDDEN!!")}
	ch, err := d.Set(context.Background(), stateOf(peer("c", ulaC, "10.0.0.3:4500", secret, secret2)))
	if err == nil {
		t.Fatal("failing state add not reported")
	}
	// Independent objects still went in: the other SA, the policies, the route.
	text := strings.Join(changeStrings(ch), "\n") + err.Error() + mustRender(t, k)
	for _, s := range []string{"add state spi 0x00002001", "add policy dir out", "add route fd00::c/128"} {
		if !strings.Contains(text, s) {
			t.Errorf("missing %q in\n%s", s, text)
		}
	}
	for _, key := range [][]byte{secret.Key, secret2.Key} {
		for _, form := range []string{string(key), string(key[:8]), strings.ToLower(string(key[:8])), hexString(key[:6])} {
			if strings.Contains(text, form) {
				t.Errorf("key material %q printed:\n%s", form, text)
			}
		}
	}
}

func hexString(b []byte) string {
	const digits = "0123456789abcdef"
	var s []byte
	for _, c := range b {
		s = append(s, digits[c>>4], digits[c&15])
	}
	return string(s)
}

// TestFallbackWithoutXfrmInterface: the ULA goes on lo, routes via the outer
// device, policies and SAs without if_id; Close removes what it added.
func TestFallbackWithoutXfrmInterface(t *testing.T) {
	k := newFakeKernel()
	k.noXfrmi = true
	d := newFake(t, k, Config{})
	if d.XfrmInterface() {
		t.Fatal("xfrm interface reported on a kernel without them")
	}
	if _, err := d.Set(context.Background(), stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))); err != nil {
		t.Fatal(err)
	}
	want := `addr fd00::a/128 dev lo
policy dir fwd fd00::b/128 -> fd00::a/128 tmpl 10.0.0.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir in fd00::b/128 -> fd00::a/128 tmpl 10.0.0.2 -> 10.0.0.1 esp tunnel reqid 0x6281
policy dir out fd00::a/128 -> fd00::b/128 tmpl 10.0.0.1 -> 10.0.0.2 esp tunnel reqid 0x6281
route fd00::b/128 dev eth0 src fd00::a proto 98 mtu 1438
state 10.0.0.1:4500 -> 10.0.0.2:4500 spi 0x00001001 esp tunnel reqid 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::a/128 -> fd00::b/128
state 10.0.0.2:4500 -> 10.0.0.1:4500 spi 0x00001002 esp tunnel reqid 0x6281 aead rfc4106(gcm(aes)) key[20] icv 128 replay-window 32 sel fd00::b/128 -> fd00::a/128
`
	if diff := cmp.Diff(want, mustRender(t, k)); diff != "" {
		t.Fatalf("fallback kernel (-want +got):\n%s", diff)
	}
	// A new ULA replaces ours on lo.
	st := stateOf()
	st.Local.ULA = netip.MustParseAddr("fd00::aa")
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff("addr fd00::aa/128 dev lo\n", mustRender(t, k)); diff != "" {
		t.Fatalf("after ULA change (-want +got):\n%s", diff)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if got := mustRender(t, k); got != "\n" {
		t.Fatalf("after Close: %q", got)
	}
}

func TestLocalOuterFromRoute(t *testing.T) {
	k := newFakeKernel()
	k.routeSrc = net.ParseIP("10.9.9.9")
	d := newFake(t, k, Config{})
	st := stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))
	st.Local.Outer = netip.Addr{}
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	if got := mustRender(t, k); !strings.Contains(got, "state 10.9.9.9:4500 -> 10.0.0.2:4500 spi 0x00001001") {
		t.Fatalf("outbound SA not from the route's source:\n%s", got)
	}
}

func TestEventsAnnotated(t *testing.T) {
	k := newFakeKernel()
	d := newFake(t, k, Config{})
	if _, err := d.Set(context.Background(), stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))); err != nil {
		t.Fatal(err)
	}
	m, err := parseMapping(marshalMapping(Event{Kind: Mapping, SPI: 0x1002, Dst: netip.MustParseAddr("10.0.0.1"), Reqid: DefaultTag,
		Old: netip.MustParseAddrPort("10.0.0.2:4500"), New: netip.MustParseAddrPort("10.0.0.2:33000")}))
	if err != nil {
		t.Fatal(err)
	}
	d.deliver(m)
	got := <-d.Events()
	if got.Peer != ulaB || got.New.Port() != 33000 {
		t.Fatalf("event = %v, want peer %v and new port 33000", got, ulaB)
	}
	if errors.Is(d.Close(), nil) == false {
		t.Fatal("close")
	}
}

// withoutLink drops the freshly made (empty) xfrm interface from a rendering.
func withoutLink(s string) string {
	var keep []string
	for _, l := range strings.SplitAfter(s, "\n") {
		if !strings.HasPrefix(l, "link btmm0 ") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "")
}

// TestUnplannablePeerKept: when the route to a peer's outer address cannot
// be looked up for a moment, Set reports it and leaves the peer's tunnel as
// it is instead of tearing it down.
func TestUnplannablePeerKept(t *testing.T) {
	k := newFakeKernel()
	d := newFake(t, k, Config{})
	st := stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))
	st.Local.Outer = netip.Addr{}
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	before := mustRender(t, k)
	k.routeErr = syscall.ENETUNREACH
	ch, err := d.Set(context.Background(), st)
	if err == nil || len(ch) != 0 {
		t.Fatalf("Set without a route = %q, %v; want an error and no changes", changeStrings(ch), err)
	}
	if diff := cmp.Diff(before, mustRender(t, k)); diff != "" {
		t.Fatalf("peer torn down (-before +after):\n%s", diff)
	}
}

// TestMoveBehindSharedNAT: two peers behind one NAT address; one peer's
// port changes. Migration could pick the wrong SA (it matches by reqid and
// addresses), so the SA is re-added with its replay state, and the other
// peer's SAs stay as they are.
func TestMoveBehindSharedNAT(t *testing.T) {
	k := newFakeKernel()
	d := newFake(t, k, Config{})
	b := peer("b", ulaB, "11.0.0.9:4500", gcm(0x1001), gcm(0x1002))
	c := peer("c", ulaC, "11.0.0.9:4600", gcm(0x2001), gcm(0x2002))
	if _, err := d.Set(context.Background(), stateOf(b, c)); err != nil {
		t.Fatal(err)
	}
	for i := range k.states {
		k.states[i].Replay = &netlink.XfrmReplayState{OSeq: 500, Seq: 600}
	}
	b.Outer = netip.MustParseAddrPort("11.0.0.9:4700")
	ch, err := d.Set(context.Background(), stateOf(b, c))
	if err != nil {
		t.Fatal(err)
	}
	if k.migrated != 0 {
		t.Errorf("used XFRM_MSG_MIGRATE %d times with ambiguous outer addresses", k.migrated)
	}
	got := mustRender(t, k)
	for _, want := range []string{
		"state 10.0.0.1:4500 -> 11.0.0.9:4700 spi 0x00001001",
		"state 11.0.0.9:4700 -> 10.0.0.1:4500 spi 0x00001002",
		"state 10.0.0.1:4500 -> 11.0.0.9:4600 spi 0x00002001",
		"state 11.0.0.9:4600 -> 10.0.0.1:4500 spi 0x00002002",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("kernel lacks %q; changes %q:\n%s", want, changeStrings(ch), got)
		}
	}
	for _, s := range k.states {
		if s.Replay.OSeq < 500 || s.Replay.Seq != 600 {
			t.Errorf("spi 0x%x replay %+v: sequence numbers lost", s.Spi, *s.Replay)
		}
	}
}

// TestInterfaceDeletedBehindOurBack: Set makes the xfrm interface again and
// restores the address and routes that went with it.
func TestInterfaceDeletedBehindOurBack(t *testing.T) {
	k := newFakeKernel()
	d := newFake(t, k, Config{})
	st := stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	want := mustRender(t, k)
	l, _ := k.LinkByName("btmm0")
	k.LinkDel(l)
	if _, err := d.Set(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, mustRender(t, k)); diff != "" {
		t.Fatalf("not restored (-want +got):\n%s", diff)
	}
}

// TestFallbackAdoptsCrashedULA: a ULA on lo as we add it (/128 nodad), left
// by a btmmd that crashed, is adopted and removed at Close; one added by
// someone else (no nodad) is used and left (issue 17: the ULA on lo after a
// crash, a restart and a stop).
func TestFallbackAdoptsCrashedULA(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags int
		left  string
	}{{"crashed btmmd's", syscall.IFA_F_NODAD, "\n"}, {"an administrator's", 0, "addr fd00::a/128 dev lo\n"}} {
		k := newFakeKernel()
		k.noXfrmi = true
		lo, _ := k.LinkByName("lo")
		k.AddrAdd(lo, &netlink.Addr{IPNet: prefix128(ulaA), Flags: tc.flags})
		d := newFake(t, k, Config{})
		if _, err := d.Set(context.Background(), stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if got := mustRender(t, k); got != tc.left {
			t.Errorf("%s ULA: after Close %q, want %q", tc.name, got, tc.left)
		}
	}
}
