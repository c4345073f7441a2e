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

// TestKeySchedule: both ends derive the same keys; every input changes them;
// directions differ; lengths fit the transforms.
func TestKeySchedule(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 32)
	ni, nr := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	ua, ub := netip.MustParseAddr("fd00::a"), netip.MustParseAddr("fd00::b")
	base := func() ([]byte, []byte) {
		i2r, r2i, err := newMaterial(secret, ni, nr).espKeys(CipherAES256GCM, 0x100, 0x200, ua, ub)
		if err != nil {
			t.Fatal(err)
		}
		return i2r, r2i
	}
	i2r, r2i := base()
	if len(i2r) != 36 || bytes.Equal(i2r, r2i) {
		t.Fatalf("gcm keys: %d bytes, directions equal=%v", len(i2r), bytes.Equal(i2r, r2i))
	}
	again, _ := base()
	if !bytes.Equal(i2r, again) {
		t.Fatal("not deterministic")
	}
	variants := map[string]func() ([]byte, error){
		"secret": func() ([]byte, error) {
			k, _, err := newMaterial(bytes.Repeat([]byte{8}, 32), ni, nr).espKeys(CipherAES256GCM, 0x100, 0x200, ua, ub)
			return k, err
		},
		"nonce_i": func() ([]byte, error) {
			k, _, err := newMaterial(secret, nr, nr).espKeys(CipherAES256GCM, 0x100, 0x200, ua, ub)
			return k, err
		},
		"nonce_r": func() ([]byte, error) {
			k, _, err := newMaterial(secret, ni, ni).espKeys(CipherAES256GCM, 0x100, 0x200, ua, ub)
			return k, err
		},
		"spi": func() ([]byte, error) {
			k, _, err := newMaterial(secret, ni, nr).espKeys(CipherAES256GCM, 0x101, 0x200, ua, ub)
			return k, err
		},
		"ula": func() ([]byte, error) {
			k, _, err := newMaterial(secret, ni, nr).espKeys(CipherAES256GCM, 0x100, 0x200, ub, ua)
			return k, err
		},
	}
	for name, f := range variants {
		k, err := f()
		if err != nil || bytes.Equal(k, i2r) {
			t.Errorf("changing %s does not change the key (err %v)", name, err)
		}
	}
	cbc, _, err := newMaterial(secret, ni, nr).espKeys(CipherAES256CBCHMAC256, 0x100, 0x200, ua, ub)
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
