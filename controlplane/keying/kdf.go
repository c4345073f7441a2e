package keying

import (
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/mlkem"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/btmm/btmm/controlplane"
)

// kdfLabel domain-separates everything this package derives.
const kdfLabel = "btmm keying v2"

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

// initKey keys the MAC of an INIT (info "mac INIT") and of an ERROR that
// answers it (info "mac ERROR"): only the authentication secret and the
// initiator's nonce are known at that point.
func initKey(secret, nonceI []byte, t MsgType) []byte {
	return hkdfKey(secret, append([]byte(kdfLabel+" init"), nonceI...), "mac "+t.String(), macLen)
}

// ephemeral is the initiator's one-time key pair of one exchange: an X25519
// key and an ML-KEM-768 decapsulation key, both made from seeds this package
// owns so erase can wipe them. It lives from INIT until the RESP is
// processed (or the exchange is abandoned), then erase drops it.
type ephemeral struct {
	xSeed [32]byte
	kSeed [mlkem.SeedSize]byte
	x     *ecdh.PrivateKey
	k     *mlkem.DecapsulationKey768
}

// ephemeralHook, when set (tests), sees every ephemeral made.
var ephemeralHook func(*ephemeral)

func newEphemeral() (*ephemeral, error) {
	e := &ephemeral{}
	rand.Read(e.xSeed[:])
	rand.Read(e.kSeed[:])
	var err error
	if e.x, err = ecdh.X25519().NewPrivateKey(e.xSeed[:]); err != nil {
		return nil, fmt.Errorf("ephemeral X25519 key: %w", err)
	}
	if e.k, err = mlkem.NewDecapsulationKey768(e.kSeed[:]); err != nil {
		return nil, fmt.Errorf("ephemeral ML-KEM-768 key: %w", err)
	}
	if ephemeralHook != nil {
		ephemeralHook(e)
	}
	return e, nil
}

// shares returns the public halves sent in INIT.
func (e *ephemeral) shares() (x, ek []byte) {
	return e.x.PublicKey().Bytes(), e.k.EncapsulationKey().Bytes()
}

// finish computes the initiator's two shared secrets from the RESP's shares.
func (e *ephemeral) finish(xR, ct []byte) (dh, kem []byte, err error) {
	pub, err := ecdh.X25519().NewPublicKey(xR)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: responder's X25519 share: %v", ErrTampered, err)
	}
	if dh, err = e.x.ECDH(pub); err != nil {
		return nil, nil, fmt.Errorf("%w: X25519 with the responder's share: %v", ErrTampered, err)
	}
	if kem, err = e.k.Decapsulate(ct); err != nil {
		clear(dh)
		return nil, nil, fmt.Errorf("%w: ML-KEM ciphertext: %v", ErrTampered, err)
	}
	return dh, kem, nil
}

// erase wipes the seeds and drops the key objects. The standard library's
// own copies inside them become unreachable and are not used again; Go
// cannot promise when their memory is overwritten (see docs/keying.md).
func (e *ephemeral) erase() {
	if e == nil {
		return
	}
	clear(e.xSeed[:])
	clear(e.kSeed[:])
	e.x, e.k = nil, nil
}

// erased reports whether erase ran (tests).
func (e *ephemeral) erased() bool {
	return e.x == nil && e.k == nil && e.xSeed == [32]byte{} && e.kSeed == [mlkem.SeedSize]byte{}
}

// respond is the responder's half of the key exchange: a fresh X25519 key
// (used once, here) and an ML-KEM encapsulation to the initiator's key.
// It returns the shares for RESP and both shared secrets.
func respond(xI, ekI []byte) (xR, ct, dh, kem []byte, err error) {
	pubI, err := ecdh.X25519().NewPublicKey(xI)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("%w: initiator's X25519 share: %v", ErrMalformed, err)
	}
	ek, err := mlkem.NewEncapsulationKey768(ekI)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("%w: initiator's ML-KEM-768 key: %v", ErrMalformed, err)
	}
	var seed [32]byte
	rand.Read(seed[:])
	priv, err := ecdh.X25519().NewPrivateKey(seed[:])
	clear(seed[:])
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("ephemeral X25519 key: %w", err)
	}
	if dh, err = priv.ECDH(pubI); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("%w: X25519 with the initiator's share: %v", ErrMalformed, err)
	}
	kem, ct = ek.Encapsulate()
	return priv.PublicKey().Bytes(), ct, dh, kem, nil
}

// material is the pseudorandom key of one completed exchange.
type material struct{ prk []byte }

// schedule derives an exchange's keys (RFC 5869 HKDF-SHA-256):
//
//	IKM  = secret || dh || kem
//	PRK1 = HKDF-Extract(salt = "btmm keying v2" || SHA-256(INIT), IKM)
//	K_resp = HKDF-Expand(PRK1, "mac RESP", 32)
//	PRK  = HKDF-Extract(salt = "btmm keying v2 session" || SHA-256(INIT || RESP), PRK1)
//
// INIT and RESP are the messages as sent (MAC included, MAC1/MAC2 not), so
// both nonces, both ephemeral shares, both SPIs, the AP-REQ/AP-REP and the
// transform are bound into every later key. respKey returns K_resp and a
// function that, given the RESP, returns the session material. It wipes
// dh, kem and the IKM it built.
func schedule(secret, dh, kem, init []byte) (respKey []byte, session func(resp []byte) material) {
	ikm := make([]byte, 0, len(secret)+len(dh)+len(kem))
	ikm = append(append(append(ikm, secret...), dh...), kem...)
	clear(dh)
	clear(kem)
	h := sha256.Sum256(init)
	prk1, err := hkdf.Extract(sha256.New, ikm, append([]byte(kdfLabel), h[:]...))
	clear(ikm)
	if err != nil {
		panic("keying: hkdf extract: " + err.Error())
	}
	k, err := hkdf.Expand(sha256.New, prk1, "mac "+MsgResp.String(), macLen)
	if err != nil {
		panic("keying: hkdf expand: " + err.Error())
	}
	return k, func(resp []byte) material {
		th := sha256.New()
		th.Write(init)
		th.Write(resp)
		prk, err := hkdf.Extract(sha256.New, prk1, append([]byte(kdfLabel+" session"), th.Sum(nil)...))
		clear(prk1)
		if err != nil {
			panic("keying: hkdf extract: " + err.Error())
		}
		return material{prk: prk}
	}
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
// request a reply answers; empty for requests) and the message itself:
//
//	MAC = HMAC-SHA-256(key, uint32be(len(T)) || T || M[:off])
//
// where off is the offset of the MAC attribute's type byte in M.
func computeMAC(key, transcript, data []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(transcript))))
	h.Write(transcript)
	h.Write(data)
	return h.Sum(nil)
}

// sign marshals m with a MAC under key over transcript and the encoding
// that precedes the MAC. m must not carry MAC1/MAC2.
func sign(m *Message, key, transcript []byte) ([]byte, error) {
	m.MAC = make([]byte, macLen) // placeholder, so the MAC attribute is laid out
	m.MAC1, m.MAC2 = nil, nil
	b, err := m.Marshal()
	if err != nil {
		return nil, err
	}
	mac := computeMAC(key, transcript, signedPart(b))
	copy(b[len(b)-macLen:], mac)
	m.MAC = mac
	return b, nil
}

// verify checks the MAC of the message msg (parsed into m; MAC1/MAC2
// already stripped).
func verify(m *Message, msg, key, transcript []byte) error {
	if m.MAC == nil {
		return fmt.Errorf("%w: %v has no MAC", ErrTampered, m.Type)
	}
	if !hmac.Equal(m.MAC, computeMAC(key, transcript, signedPart(msg))) {
		return fmt.Errorf("%w: %v MAC mismatch", ErrTampered, m.Type)
	}
	return nil
}
