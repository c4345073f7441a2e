package keying

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/mlkem"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"net/netip"
	"testing"
	"testing/synctest"
	"time"
)

// TestDocClient is an initiator written from docs/keying.md alone (message
// and attribute layout, fragmentation, "Exactly what each MAC covers", the
// key schedule), with the standard library's crypto and none of this
// package's codec or key derivation, keying in PSK mode with a real Agent.
// The responder must accept its INIT (MAC1 and MAC), its RESP and ACK must
// verify under the documented keys, and the SAs the responder installs must
// be the ones the documented ESP key derivation gives. Issue 13 item 6: "a
// client written from the doc" interoperates.
func TestDocClient(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		ulaD := netip.MustParseAddr("fd00::1") // below b's: b answers even while its own INIT is out
		addrD := netip.MustParseAddrPort("10.0.0.4:4500")
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if from == addrB && to == addrD && msgType(b) == MsgInit {
				return nil // b answers; the doc client only initiates
			}
			return b
		}
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), nil)
		b.peers(t, PeerConfig{Name: "d", ULA: ulaD, Outer: addrD})
		d := n.endpoint(addrD.String())
		recv := make(chan []byte, 16)
		go func() {
			buf := make([]byte, 65536)
			for {
				k, _, err := d.ReadKeying(buf)
				if err != nil {
					return
				}
				recv <- bytes.Clone(buf[:k])
			}
		}()
		t.Cleanup(d.Close)

		const label = "btmm keying v2"
		secret := psk1 // PSK mode: the secret is the file's bytes
		h := func(b ...[]byte) []byte {
			s := sha256.New()
			for _, x := range b {
				s.Write(x)
			}
			return s.Sum(nil)
		}
		kdf := func(secret, salt []byte, info string) []byte {
			k, err := hkdf.Key(sha256.New, secret, salt, info, 32)
			if err != nil {
				t.Fatal(err)
			}
			return k
		}
		mac := func(key, transcript, before []byte) []byte {
			m := hmac.New(sha256.New, key)
			m.Write(binary.BigEndian.AppendUint32(nil, uint32(len(transcript))))
			m.Write(transcript)
			m.Write(before)
			return m.Sum(nil)
		}
		short := func(key, data []byte) []byte {
			m := hmac.New(sha256.New, key)
			m.Write(data)
			return m.Sum(nil)[:16]
		}
		header := func(typ byte, ex []byte) []byte { return append([]byte{2, typ, 2, 0}, ex...) }
		attr := func(b []byte, typ byte, v []byte) []byte {
			b = append(b, typ)
			b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
			return append(b, v...)
		}
		// signed appends the MAC attribute: MAC over the length-prefixed
		// transcript and everything before the MAC attribute.
		signed := func(b, key, transcript []byte) []byte {
			return attr(b, 253, mac(key, transcript, b))
		}
		ula16 := func(a netip.Addr) []byte { x := a.As16(); return x[:] }
		u32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

		// INIT.
		ex := make([]byte, 8)
		rand.Read(ex)
		nonceI := make([]byte, 32)
		rand.Read(nonceI)
		xI, err := ecdh.X25519().GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		kI, err := mlkem.GenerateKey768()
		if err != nil {
			t.Fatal(err)
		}
		const spiI = 0x1234567
		init := header(1, ex)
		init = attr(init, 1, nonceI)
		init = attr(init, 2, u32(spiI))
		init = attr(init, 3, ula16(ulaD))
		init = attr(init, 4, []byte{1}) // AES-256-GCM
		init = attr(init, 6, binary.BigEndian.AppendUint64(nil, uint64(time.Now().Unix())))
		init = attr(init, 13, xI.PublicKey().Bytes())
		init = attr(init, 14, kI.EncapsulationKey().Bytes())
		init = signed(init, kdf(secret, append([]byte(label+" init"), nonceI...), "mac INIT"), nil)
		// Fragments of 1141 bytes, each with MAC1 for b.
		id := kdf(secret, []byte(label+" psk"), "identity")
		kMAC1 := h([]byte(label+" mac1"), ula16(ulaB), id)
		count := (len(init) + 1140) / 1141
		for i := range count {
			f := header(10, ex)
			f = attr(f, 17, []byte{1, byte(i), byte(count)})
			f = attr(f, 18, init[i*1141:min(len(init), (i+1)*1141)])
			f = attr(f, 254, short(kMAC1, f))
			if len(f) > 1200 {
				t.Fatalf("INIT piece %d is %d bytes", i, len(f))
			}
			if err := d.WriteKeying(f, addrB); err != nil {
				t.Fatal(err)
			}
		}

		// parse splits a message into its header and attributes, and
		// returns the offset of the MAC attribute.
		parse := func(b []byte) (typ byte, attrs map[byte][]byte, macOff int) {
			if len(b) < 12 || b[0] != 2 || !bytes.Equal(b[4:12], ex) {
				t.Fatalf("answer with a bad header: % x", b[:min(len(b), 12)])
			}
			attrs = map[byte][]byte{}
			for i := 12; i < len(b); {
				l := int(binary.BigEndian.Uint16(b[i+1:]))
				if b[i] == 253 {
					macOff = i
				}
				attrs[b[i]] = b[i+3 : i+3+l]
				i += 3 + l
			}
			return b[1], attrs, macOff
		}
		next := func() []byte {
			select {
			case m := <-recv:
				return m
			case <-time.After(2 * time.Second):
				st, _ := b.agent.Stats(t.Context())
				t.Fatalf("no answer from the responder: %+v; %+v", st, b.status(t))
				return nil
			}
		}

		// RESP, in pieces.
		var resp []byte
		for have := 0; ; {
			typ, a, _ := parse(next())
			if typ != 10 || a[17][0] != 2 || int(a[17][1]) != have {
				t.Fatalf("want RESP piece %d, got type %d %v", have, typ, a[17])
			}
			resp = append(resp, a[18]...)
			if have++; have == int(a[17][2]) {
				break
			}
		}
		typ, ra, off := parse(resp)
		if typ != 2 {
			t.Fatalf("reassembled type %d, want RESP", typ)
		}
		pubR, err := ecdh.X25519().NewPublicKey(ra[13])
		if err != nil {
			t.Fatal(err)
		}
		dh, err := xI.ECDH(pubR)
		if err != nil {
			t.Fatal(err)
		}
		kem, err := kI.Decapsulate(ra[14])
		if err != nil {
			t.Fatal(err)
		}
		ikm := append(append(bytes.Clone(secret), dh...), kem...)
		prk1, err := hkdf.Extract(sha256.New, ikm, append([]byte(label), h(init)...))
		if err != nil {
			t.Fatal(err)
		}
		expand := func(prk []byte, info string, n int) []byte {
			k, err := hkdf.Expand(sha256.New, prk, info, n)
			if err != nil {
				t.Fatal(err)
			}
			return k
		}
		if !hmac.Equal(ra[253], mac(expand(prk1, "mac RESP", 32), init, resp[:off])) {
			t.Fatal("the RESP's MAC does not verify as documented")
		}
		prk, err := hkdf.Extract(sha256.New, prk1, append([]byte(label+" session"), h(init, resp)...))
		if err != nil {
			t.Fatal(err)
		}
		if ra[5][0] != 1 || !bytes.Equal(ra[3], ula16(ulaB)) {
			t.Fatalf("RESP chose cipher %d for ULA % x", ra[5][0], ra[3])
		}
		spiR := binary.BigEndian.Uint32(ra[2])
		espInfo := func(dir string) string {
			b := append([]byte("esp "+dir), 1)
			b = append(append(b, u32(spiI)...), u32(spiR)...)
			return string(append(append(b, ula16(ulaD)...), ula16(ulaB)...))
		}
		i2r, r2i := expand(prk, espInfo("i2r"), 36), expand(prk, espInfo("r2i"), 36)

		// CONFIRM, then the ACK.
		confirm := header(3, ex)
		confirm = attr(confirm, 2, u32(spiI))
		confirm = attr(confirm, 3, ula16(ulaD))
		confirm = signed(confirm, expand(prk, "mac CONFIRM", 32), nil)
		if err := d.WriteKeying(confirm, addrB); err != nil {
			t.Fatal(err)
		}
		ack := next()
		typ, aa, off := parse(ack)
		if typ != 4 || !hmac.Equal(aa[253], mac(expand(prk, "mac ACK", 32), nil, ack[:off])) {
			t.Fatalf("ACK (type %d) does not verify as documented", typ)
		}
		synctest.Wait()
		p, ok := b.rec.peer(ulaD)
		if !ok {
			t.Fatalf("b installed nothing: %q", b.rec.Calls())
		}
		if p.In.SPI != spiR || !bytes.Equal(p.In.Key, i2r) || p.Out.SPI != spiI || !bytes.Equal(p.Out.Key, r2i) || p.Outer != addrD {
			t.Errorf("b's SAs for the doc client differ from the documented derivation: out=%08x in=%08x outer %v", p.Out.SPI, p.In.SPI, p.Outer)
		}
		if st := b.status(t); !st.Established || st.Pending {
			t.Errorf("b: %+v", st)
		}
	})
}
