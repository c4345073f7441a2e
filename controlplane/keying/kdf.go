package keying

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/btmm/btmm/controlplane"
)

// kdfLabel domain-separates everything this package derives.
const kdfLabel = "btmm keying v1"

// cipherInfo describes an on-wire transform.
type cipherInfo struct {
	name   controlplane.Cipher
	keyLen int
}

var ciphers = map[CipherID]cipherInfo{
	CipherAES256GCM:        {controlplane.CipherAESGCM, 36},
	CipherAES256CBCHMAC256: {controlplane.CipherAESCBCHMAC, 64},
}

// CipherIDFor returns the wire number of a dataplane transform.
func CipherIDFor(c controlplane.Cipher) (CipherID, error) {
	for id, ci := range ciphers {
		if ci.name == c {
			return id, nil
		}
	}
	return 0, fmt.Errorf("cipher %q cannot be negotiated", c)
}

// hkdfKey is HKDF-SHA-256 (RFC 5869); it cannot fail for our lengths.
func hkdfKey(secret, salt []byte, info string, n int) []byte {
	k, err := hkdf.Key(sha256.New, secret, salt, info, n)
	if err != nil {
		panic("keying: hkdf: " + err.Error()) // only for n > 255*32
	}
	return k
}

// initMACKey keys the MAC of an INIT: only the initiator's nonce is known yet.
func initMACKey(secret, nonceI []byte) []byte {
	return hkdfKey(secret, append([]byte(kdfLabel+" init"), nonceI...), "mac init", macLen)
}

// material is the pseudorandom key of one exchange: HKDF-Extract over the
// shared secret (Kerberos subkey or PSK) salted with both nonces.
type material struct{ prk []byte }

func newMaterial(secret, nonceI, nonceR []byte) material {
	salt := append(append([]byte(kdfLabel), nonceI...), nonceR...)
	prk, err := hkdf.Extract(sha256.New, secret, salt)
	if err != nil {
		panic("keying: hkdf extract: " + err.Error())
	}
	return material{prk: prk}
}

func (m material) expand(info string, n int) []byte {
	k, err := hkdf.Expand(sha256.New, m.prk, info, n)
	if err != nil {
		panic("keying: hkdf expand: " + err.Error())
	}
	return k
}

// macKey derives the MAC key for one message type of the exchange.
func (m material) macKey(t MsgType) []byte { return m.expand("mac "+t.String(), macLen) }

// espKeys derives the initiator-to-responder and responder-to-initiator ESP
// keys. Both SPIs, both ULAs and the transform are bound into the info, so a
// key is never reused for another SA.
func (m material) espKeys(c CipherID, spiI, spiR uint32, ulaI, ulaR netip.Addr) (i2r, r2i []byte, err error) {
	ci, ok := ciphers[c]
	if !ok {
		return nil, nil, fmt.Errorf("%w: cipher %d", ErrNoProposal, c)
	}
	info := func(dir string) string {
		b := []byte("esp " + dir)
		b = append(b, byte(c))
		b = binary.BigEndian.AppendUint32(b, spiI)
		b = binary.BigEndian.AppendUint32(b, spiR)
		a, z := ulaI.As16(), ulaR.As16()
		b = append(append(b, a[:]...), z[:]...)
		return string(b)
	}
	return m.expand(info("i2r"), ci.keyLen), m.expand(info("r2i"), ci.keyLen), nil
}

// computeMAC is HMAC-SHA-256 over the length-prefixed transcript (the
// request a reply answers; empty for requests) and the message itself.
func computeMAC(key, transcript, data []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(transcript))))
	h.Write(transcript)
	h.Write(data)
	return h.Sum(nil)
}

// sign marshals m with a MAC under key over transcript and the encoding
// that precedes the MAC.
func sign(m *Message, key, transcript []byte) ([]byte, error) {
	m.MAC = make([]byte, macLen) // placeholder, so the MAC attribute is laid out
	b, err := m.Marshal()
	if err != nil {
		return nil, err
	}
	mac := computeMAC(key, transcript, signedPart(b))
	copy(b[len(b)-macLen:], mac)
	m.MAC = mac
	return b, nil
}

// verify checks the MAC of an encoded message parsed into m.
func verify(m *Message, raw, key, transcript []byte) error {
	if m.MAC == nil {
		return fmt.Errorf("%w: %v has no MAC", ErrTampered, m.Type)
	}
	if !hmac.Equal(m.MAC, computeMAC(key, transcript, signedPart(raw))) {
		return fmt.Errorf("%w: %v MAC mismatch", ErrTampered, m.Type)
	}
	return nil
}
