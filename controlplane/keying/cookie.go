package keying

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"net/netip"
	"time"
)

// Handshake DoS discipline, after WireGuard's cookie reply (wireguard-go
// device/cookie.go) and rate limiter: every datagram that would make a
// responder work without state (an INIT, or a FRAGMENT of one) carries
//
//	MAC1 = HMAC-SHA-256(K_mac1, datagram[:off1])[:16]
//	MAC2 = HMAC-SHA-256(cookie, datagram[:off2])[:16]    (when it has a cookie)
//
// where off1/off2 are the offsets of the MAC1/MAC2 attributes' type bytes.
// K_mac1 = SHA-256("btmm keying v2 mac1" || ULA_r || id_r) needs the
// responder's ULA and identity (its principal name@REALM, or a key derived
// from the PSK), so a datagram from someone who does not know whom it is
// talking to is dropped after one HMAC. Under load, the responder also wants
// MAC2 keyed with a cookie bound to the sender's address and port
// (HMAC-SHA-256 of a secret that changes every two minutes): without it, the
// sender gets a COOKIE message (smaller than what it sent) and nothing else;
// the cookie comes sealed with AES-256-GCM under
// K_cookie = SHA-256("btmm keying v2 cookie" || ULA_r || id_r), with the MAC1
// it answers as additional data. A per-source token bucket limits what any
// one address can make the responder do, cookie replies included.

const (
	cookieRotate   = 2 * time.Minute // responder secret lifetime
	cookieValidFor = 2*time.Minute - 10*time.Second
)

func identityKey(label string, ula netip.Addr, id []byte) []byte {
	h := sha256.New()
	h.Write([]byte(kdfLabel + " " + label))
	a := ula.As16()
	h.Write(a[:])
	h.Write(id)
	return h.Sum(nil)
}

// mac1Key and cookieKey are the responder's (ULA, identity) keys.
func mac1Key(ula netip.Addr, id []byte) []byte   { return identityKey("mac1", ula, id) }
func cookieKey(ula netip.Addr, id []byte) []byte { return identityKey("cookie", ula, id) }

func shortMAC(key, data []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(data)
	return h.Sum(nil)[:cookieMACLen]
}

// addMACs appends MAC1 (and MAC2 when cookie is set) to an encoded datagram
// that has neither.
func addMACs(b, k1, cookie []byte) []byte {
	b = append(b, attrMAC1, 0, cookieMACLen)
	b = append(b, shortMAC(k1, b[:len(b)-3])...)
	if cookie != nil {
		b = append(b, attrMAC2, 0, cookieMACLen)
		b = append(b, shortMAC(cookie, b[:len(b)-3])...)
	}
	return b
}

// mac1OK checks a parsed datagram's MAC1.
func mac1OK(m *Message, b, k1 []byte) bool {
	if m.MAC1 == nil {
		return false
	}
	off := len(b) - attrLen(cookieMACLen)
	if m.MAC2 != nil {
		off -= attrLen(cookieMACLen)
	}
	return hmac.Equal(m.MAC1, shortMAC(k1, b[:off]))
}

// cookieJar is the responder's cookie secret (current and previous).
type cookieJar struct {
	cur, prev []byte
	rotated   time.Time
}

func (j *cookieJar) rotate(now time.Time) {
	if j.cur != nil && now.Sub(j.rotated) < cookieRotate {
		return
	}
	j.prev = nil
	if j.cur != nil && now.Sub(j.rotated) < 2*cookieRotate {
		j.prev = j.cur // cookies handed out just before the change stay good
	}
	j.cur, j.rotated = randBytes(32), now
}

func cookieFor(secret []byte, from netip.AddrPort) []byte {
	b, _ := from.MarshalBinary()
	return shortMAC(secret, b)
}

// mac2OK checks a datagram's MAC2 against the cookie its sender's address
// would have got from the current or the previous secret.
func (j *cookieJar) mac2OK(m *Message, b []byte, from netip.AddrPort, now time.Time) bool {
	j.rotate(now)
	if m.MAC2 == nil {
		return false
	}
	data := b[:len(b)-attrLen(cookieMACLen)]
	for _, s := range [][]byte{j.cur, j.prev} {
		if s != nil && hmac.Equal(m.MAC2, shortMAC(cookieFor(s, from), data)) {
			return true
		}
	}
	return false
}

// seal makes the COOKIE attribute for from, answering a datagram whose MAC1
// was mac1: nonce(12) || AES-256-GCM(K_cookie, cookie, ad = mac1).
func (j *cookieJar) seal(key []byte, from netip.AddrPort, mac1 []byte, now time.Time) []byte {
	j.rotate(now)
	aead := newGCM(key)
	nonce := randBytes(aead.NonceSize())
	return aead.Seal(nonce, nonce, cookieFor(j.cur, from), mac1)
}

// openCookie is the initiator's side of seal.
func openCookie(key, sealed, mac1 []byte) ([]byte, error) {
	aead := newGCM(key)
	if len(sealed) != sealedLen {
		return nil, fmt.Errorf("%w: cookie of %d bytes", ErrMalformed, len(sealed))
	}
	c, err := aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], mac1)
	if err != nil {
		return nil, fmt.Errorf("%w: cookie does not open", ErrTampered)
	}
	return c, nil
}

func newGCM(key []byte) cipher.AEAD {
	b, err := aes.NewCipher(key)
	if err != nil {
		panic("keying: aes: " + err.Error())
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic("keying: gcm: " + err.Error())
	}
	return g
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// rateLimiter is a token bucket per source (an IPv4 address, or an IPv6
// /64), like wireguard-go's ratelimiter: Rate tokens a second up to Burst.
// At most maxEntries sources are tracked; full buckets idle for a second are
// forgotten by gc. When the table is full, a new source is refused (a
// flood of spoofed sources cannot grow memory; it makes the responder
// "under load", so genuine senders come back with a cookie, which only a
// real address can get).
type rateLimiter struct {
	rate, burst float64
	max         int
	table       map[netip.Prefix]*bucket
	lastGC      time.Time
}

type bucket struct {
	tokens float64
	at     time.Time
}

func newRateLimiter(rate float64, burst, max int) *rateLimiter {
	return &rateLimiter{rate: rate, burst: float64(burst), max: max, table: map[netip.Prefix]*bucket{}}
}

func sourceKey(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(64)
	return p
}

// allow takes one token from a's bucket.
func (r *rateLimiter) allow(a netip.Addr, now time.Time) bool {
	r.gc(now)
	k := sourceKey(a)
	b := r.table[k]
	if b == nil {
		if len(r.table) >= r.max {
			return false
		}
		b = &bucket{tokens: r.burst, at: now}
		r.table[k] = b
	}
	b.tokens = min(r.burst, b.tokens+now.Sub(b.at).Seconds()*r.rate)
	b.at = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

func (r *rateLimiter) full() bool { return len(r.table) >= r.max }

func (r *rateLimiter) gc(now time.Time) {
	if now.Sub(r.lastGC) < time.Second {
		return
	}
	r.lastGC = now
	for k, b := range r.table {
		if now.Sub(b.at) >= time.Second && b.tokens+now.Sub(b.at).Seconds()*r.rate >= r.burst {
			delete(r.table, k)
		}
	}
}

// loadMeter counts the stateless work a responder accepted in the current
// second; above limit the responder is "under load" and wants cookies.
type loadMeter struct {
	limit  int
	window time.Time
	n      int
}

func (l *loadMeter) add(now time.Time) {
	if now.Sub(l.window) >= time.Second {
		l.window, l.n = now, 0
	}
	l.n++
}

func (l *loadMeter) high(now time.Time) bool {
	return now.Sub(l.window) < time.Second && l.n >= l.limit
}
