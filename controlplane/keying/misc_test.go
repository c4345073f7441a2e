package keying

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/controlplane"
	"github.com/jcmturner/gokrb5/v8/keytab"
)

func TestLoadPSK(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := strings.Repeat("k", 48) + "\n"
	if p, err := LoadPSK(write("good", good, 0o600)); err != nil || !bytes.Equal(p.secret, []byte(strings.Repeat("k", 48))) {
		t.Errorf("0600 file: %v", err)
	}
	for name, tc := range map[string]struct {
		content string
		mode    os.FileMode
		want    string
	}{
		"group readable": {good, 0o640, "chmod 600"},
		"world readable": {good, 0o604, "chmod 600"},
		"short":          {"short secret\n", 0o600, "at least 32"},
	} {
		_, err := LoadPSK(write(name, tc.content, tc.mode))
		if !errors.Is(err, ErrBadSecret) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrBadSecret mentioning %q", name, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "kkkk") {
			t.Errorf("%s: error shows the secret: %v", name, err)
		}
	}
	if _, err := LoadPSK(filepath.Join(dir, "missing")); !errors.Is(err, ErrBadSecret) {
		t.Errorf("missing: %v", err)
	}
	p, _ := NewPSK([]byte(good))
	if s := fmt.Sprint(p); strings.Contains(s, "kkk") {
		t.Errorf("PSK prints its secret: %s", s)
	}
}

func TestDefaultPrincipal(t *testing.T) {
	for _, tc := range []struct{ host, domain, realm, want string }{
		{"laptop", "alice.members.btmm.example.", "BTMM.EXAMPLE", "host/laptop.alice.members.btmm.example@BTMM.EXAMPLE"},
		{"laptop.", ".d.example", "", "host/laptop.d.example"},
	} {
		if got := DefaultPrincipal(tc.host, tc.domain, tc.realm); got != tc.want {
			t.Errorf("DefaultPrincipal(%q, %q, %q) = %q, want %q", tc.host, tc.domain, tc.realm, got, tc.want)
		}
	}
}

// TestHKDFVector checks the HKDF we use against RFC 5869 test case 1.
func TestHKDFVector(t *testing.T) {
	ikm := bytes.Repeat([]byte{0x0b}, 22)
	salt, _ := hex.DecodeString("000102030405060708090a0b0c")
	info, _ := hex.DecodeString("f0f1f2f3f4f5f6f7f8f9")
	want := "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
	if got := hex.EncodeToString(hkdfKey(ikm, salt, string(info), 42)); got != want {
		t.Fatalf("HKDF = %s, want %s", got, want)
	}
	k, _ := hkdf.Key(sha256.New, ikm, salt, string(info), 42)
	if hex.EncodeToString(k) != want {
		t.Fatal("crypto/hkdf disagrees with RFC 5869")
	}
}

// TestKeySchedule: both ends derive the same keys from the ephemeral
// exchange; every input (secret, each shared secret, INIT, RESP, SPI, ULA)
// changes them; directions differ; lengths fit the transforms.
func TestKeySchedule(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 32)
	initMsg, respMsg := []byte("the INIT as sent"), []byte("the RESP as sent")
	ua, ub := netip.MustParseAddr("fd00::a"), netip.MustParseAddr("fd00::b")
	eph, err := newEphemeral()
	if err != nil {
		t.Fatal(err)
	}
	xI, ek := eph.shares()
	xR, ct, dhR, kemR, err := respond(xI, ek)
	if err != nil {
		t.Fatal(err)
	}
	dhI, kemI, err := eph.finish(xR, ct)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dhI, dhR) || !bytes.Equal(kemI, kemR) || len(dhI) != 32 || len(kemI) != 32 {
		t.Fatal("the two ends' shared secrets differ")
	}
	keys := func(secret, dh, kem, init, resp []byte, spi uint32, ulaI netip.Addr) (rk, i2r, r2i []byte) {
		rk, session := schedule(secret, bytes.Clone(dh), bytes.Clone(kem), init)
		i2r, r2i, err := session(resp).espKeys(CipherAES256GCM, spi, 0x200, ulaI, ub)
		if err != nil {
			t.Fatal(err)
		}
		return rk, i2r, r2i
	}
	rk, i2r, r2i := keys(secret, dhI, kemI, initMsg, respMsg, 0x100, ua)
	rkR, i2rR, r2iR := keys(secret, dhR, kemR, initMsg, respMsg, 0x100, ua)
	if !bytes.Equal(rk, rkR) || !bytes.Equal(i2r, i2rR) || !bytes.Equal(r2i, r2iR) {
		t.Fatal("initiator and responder derive different keys")
	}
	if len(i2r) != 36 || bytes.Equal(i2r, r2i) {
		t.Fatalf("gcm keys: %d bytes, directions equal=%v", len(i2r), bytes.Equal(i2r, r2i))
	}
	flip := func(b []byte) []byte { c := bytes.Clone(b); c[0] ^= 1; return c }
	for name, k := range map[string][]byte{
		"secret": func() []byte { _, k, _ := keys(flip(secret), dhI, kemI, initMsg, respMsg, 0x100, ua); return k }(),
		"dh":     func() []byte { _, k, _ := keys(secret, flip(dhI), kemI, initMsg, respMsg, 0x100, ua); return k }(),
		"kem":    func() []byte { _, k, _ := keys(secret, dhI, flip(kemI), initMsg, respMsg, 0x100, ua); return k }(),
		"INIT":   func() []byte { _, k, _ := keys(secret, dhI, kemI, flip(initMsg), respMsg, 0x100, ua); return k }(),
		"RESP":   func() []byte { _, k, _ := keys(secret, dhI, kemI, initMsg, flip(respMsg), 0x100, ua); return k }(),
		"spi":    func() []byte { _, k, _ := keys(secret, dhI, kemI, initMsg, respMsg, 0x101, ua); return k }(),
		"ula": func() []byte {
			_, k, _ := keys(secret, dhI, kemI, initMsg, respMsg, 0x100, netip.MustParseAddr("fd00::c"))
			return k
		}(),
	} {
		if bytes.Equal(k, i2r) {
			t.Errorf("changing %s does not change the key", name)
		}
	}
	if rk2, _, _ := keys(secret, dhI, kemI, flip(initMsg), respMsg, 0x100, ua); bytes.Equal(rk2, rk) {
		t.Error("the RESP MAC key does not depend on the INIT")
	}
	_, session := schedule(secret, bytes.Clone(dhI), bytes.Clone(kemI), initMsg)
	cbc, _, err := session(respMsg).espKeys(CipherAES256CBCHMAC256, 0x100, 0x200, ua, ub)
	if err != nil || len(cbc) != 64 {
		t.Fatalf("cbc+hmac key: %d bytes, %v", len(cbc), err)
	}
	sa := controlplane.SA{SPI: 0x100, Cipher: controlplane.CipherAESCBCHMAC, Key: cbc}
	st := controlplane.State{Local: controlplane.Local{ULA: ua, Port: 4500},
		Peers: []controlplane.Peer{{Name: "b", ULA: ub, Outer: netip.MustParseAddrPort("192.0.2.1:4500"), Out: sa,
			In: controlplane.SA{SPI: 0x200, Cipher: controlplane.CipherAESGCM, Key: i2r}}}}
	if err := st.Validate(); err != nil {
		t.Errorf("derived keys do not fit the dataplane: %v", err)
	}
	eph.erase()
	if !eph.erased() {
		t.Error("erase left key material")
	}
}

// TestForwardSecrecyKeySchedule: the same authentication secret (a
// Kerberos subkey or the PSK), the same nonces, SPIs and ULAs in two
// exchanges give different ESP keys, because the ephemeral X25519 and
// ML-KEM secrets differ; and whoever records INIT and RESP and knows the
// secret cannot derive them without one of the ephemeral private keys.
func TestForwardSecrecyKeySchedule(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 32)
	ua, ub := netip.MustParseAddr("fd00::a"), netip.MustParseAddr("fd00::b")
	run := func() (init, resp, key []byte) {
		eph, err := newEphemeral()
		if err != nil {
			t.Fatal(err)
		}
		defer eph.erase()
		xI, ek := eph.shares()
		xR, ct, dh, kem, err := respond(xI, ek)
		if err != nil {
			t.Fatal(err)
		}
		init = append(append([]byte("INIT"), xI...), ek...) // what a recorder sees
		resp = append(append([]byte("RESP"), xR...), ct...)
		_, session := schedule(secret, dh, kem, init)
		k, _, err := session(resp).espKeys(CipherAES256GCM, 0x100, 0x200, ua, ub)
		if err != nil {
			t.Fatal(err)
		}
		return init, resp, k
	}
	i1, r1, k1 := run()
	_, _, k2 := run()
	if bytes.Equal(k1, k2) {
		t.Fatal("two exchanges with the same secret derived the same ESP key")
	}
	// A recorder with the secret and the transcript, guessing the
	// ephemeral secrets as anything it can compute from public values.
	for _, guess := range [][2][]byte{
		{make([]byte, 32), make([]byte, 32)},
		{i1[4:36], r1[4:36]},
	} {
		_, session := schedule(secret, bytes.Clone(guess[0]), bytes.Clone(guess[1]), i1)
		k, _, _ := session(r1).espKeys(CipherAES256GCM, 0x100, 0x200, ua, ub)
		if bytes.Equal(k, k1) {
			t.Fatal("the ESP key follows from the secret and the public transcript")
		}
	}
}

// TestUDPTransport: the marker is added and stripped; datagrams without it
// (ESP, NAT keepalives) are skipped.
func TestUDPTransport(t *testing.T) {
	a, err := ListenUDP(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := ListenUDP(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	// A NAT keepalive and an "ESP" packet, then a keying message.
	b.conn.WriteToUDPAddrPort([]byte{0xff}, a.LocalAddr())
	b.conn.WriteToUDPAddrPort([]byte{0, 0, 1, 0, 0, 0, 0, 1}, a.LocalAddr())
	if err := b.WriteKeying([]byte("hello"), a.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	a.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	n, from, err := a.ReadKeying(buf)
	if err != nil || string(buf[:n]) != "hello" || from != b.LocalAddr() {
		t.Fatalf("ReadKeying = %q from %v, %v", buf[:n], from, err)
	}
}

// TestStatusHidesKeys: nothing an operator can print carries key bytes.
func TestStatusHidesKeys(t *testing.T) {
	kt := keytab.New()
	if err := kt.AddEntry("host/a.example", "EXAMPLE", "password", time.Now(), 1, 18); err != nil {
		t.Fatal(err)
	}
	kk := &Kerberos{Principal: "host/a.example", Keytab: kt}
	key := kt.Entries[0].Key.KeyValue
	for _, out := range []string{fmt.Sprint(kk), fmt.Sprintf("%v %+v %s", kk, kk, kk)} {
		if strings.Contains(out, hex.EncodeToString(key[:4])) || strings.Contains(out, fmt.Sprint(key[:4])[1:8]) {
			t.Errorf("Kerberos prints its keytab: %s", out)
		}
	}
	k := bytes.Repeat([]byte{0xab}, 36)
	s := PeerStatus{Out: controlplane.SA{SPI: 0x100, Cipher: controlplane.CipherAESGCM, Key: k}}
	for _, out := range []string{fmt.Sprint(s.Out), fmt.Sprintf("%v", s.Out)} {
		if strings.Contains(out, "abab") || strings.Contains(out, string(k)) {
			t.Errorf("key printed: %s", out)
		}
	}
}
