package keying

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"time"
)

// Auth authenticates the two ends of an exchange and yields the secret the
// ESP keys are derived from (with the ephemeral key exchange). The
// implementations are Kerberos and PSK.
type Auth interface {
	Mode() Mode
	// initiate prepares an INIT for peer: the token to carry (AP-REQ), the
	// secret shared with the peer, and a check for the peer's reply token.
	// It returns when ctx ends even if the KDC has not answered.
	initiate(ctx context.Context, peer PeerConfig, now time.Time, pol authPolicy) (*initiation, error)
	// accept verifies the authentication part of an INIT from peer (the MAC
	// is checked by the caller with the returned secret).
	accept(m *Message, peer PeerConfig, now time.Time, pol authPolicy) (*acceptance, error)
	// identity is what MAC1 and the cookie key are bound to besides the
	// responder's ULA: the responder's identity (peer nil: this host's).
	identity(peer *PeerConfig) []byte
	// maxSkew is the accepted clock difference.
	maxSkew() time.Duration
}

// authPolicy is what the agent asks of authentication.
type authPolicy struct {
	// maxAuthAge: a Kerberos INIT is refused when its ticket's initial
	// authentication (authtime) is older; the initiator logs in again
	// (AS exchange) once half of it has passed. Zero: no limit.
	maxAuthAge time.Duration
}

type initiation struct {
	token                  []byte // AP-REQ (Kerberos), nil (PSK)
	secret                 []byte // subkey or pre-shared key
	owned                  bool   // secret is this exchange's own (a subkey): wipe it after use
	ticketStart, ticketEnd time.Time
	authTime               time.Time              // the ticket's initial authentication
	checkReply             func(m *Message) error // verifies the AP-REP of a RESP
	time                   int64                  // PSK: the INIT's Time attribute
}

func (in *initiation) erase() {
	if in != nil && in.owned {
		clear(in.secret)
	}
}

type acceptance struct {
	secret                 []byte
	owned                  bool
	reply                  []byte // AP-REP
	ticketStart, ticketEnd time.Time
	authTime               time.Time
	sent                   time.Time // when the initiator made the INIT, by its clock
	replayKey              string    // what identifies this INIT for the replay cache
	replayUntil            time.Time // how long the replay cache must remember it
}

func (ac *acceptance) erase() {
	if ac != nil && ac.owned {
		clear(ac.secret)
	}
}

// PSK authenticates with a secret shared by all of a user's hosts, for hosts
// without Kerberos. Unlike racoon's FQDN-as-key, the secret is random and
// never on the wire; ESP keys come from HKDF over it and both fresh nonces.
// Any holder of the secret can claim any of the user's ULAs: PSK mode trusts
// every host that has the file.
type PSK struct {
	mu     sync.RWMutex // guards secret and id, which Rotate replaces
	secret []byte
	id     []byte // identity, derived from secret
	// MaxClockSkew bounds how old an INIT may be (default 5 min); INITs are
	// remembered that long, so a replayed INIT is refused.
	MaxClockSkew time.Duration
}

// MinPSKLen is the shortest secret accepted (32 bytes: 256 bits if random).
const MinPSKLen = 32

// LoadPSK reads a pre-shared key file. The file must be a regular file not
// readable or writable by group or others (mode 0600 or stricter) and hold
// at least MinPSKLen bytes (surrounding whitespace is ignored), e.g. made with
// `head -c 48 /dev/urandom | base64 > psk && chmod 600 psk`.
func LoadPSK(path string) (*PSK, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("load pre-shared key: %w: %w", ErrBadSecret, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("load pre-shared key %s: %w: not a regular file", path, ErrBadSecret)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("load pre-shared key %s: %w: mode %04o lets others read it; chmod 600 %s", path, ErrBadSecret, perm, path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load pre-shared key: %w: %w", ErrBadSecret, err)
	}
	return NewPSK(bytes.TrimSpace(b))
}

// NewPSK uses secret (copied) as the pre-shared key.
func NewPSK(secret []byte) (*PSK, error) {
	if len(secret) < MinPSKLen {
		return nil, fmt.Errorf("pre-shared key: %w: %d bytes, want at least %d", ErrBadSecret, len(secret), MinPSKLen)
	}
	return &PSK{secret: bytes.Clone(secret)}, nil
}

// Mode reports ModePSK.
func (p *PSK) Mode() Mode { return ModePSK }

// String never shows the secret.
func (p *PSK) String() string { return fmt.Sprintf("psk([%d bytes redacted])", len(p.get())) }

func (p *PSK) get() []byte {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.secret
}

// Rotate makes p use next's secret for exchanges from now on (a PSK file
// re-read on SIGHUP); SAs already keyed keep their keys until their rekey.
// MAC1 and cookie keys follow at once.
func (p *PSK) Rotate(next *PSK) {
	s, id := next.get(), next.identity(nil)
	p.mu.Lock()
	p.secret, p.id = s, id
	p.mu.Unlock()
}

func (p *PSK) maxSkew() time.Duration {
	if p.MaxClockSkew > 0 {
		return p.MaxClockSkew
	}
	return 5 * time.Minute
}

func (p *PSK) initiate(_ context.Context, _ PeerConfig, now time.Time, _ authPolicy) (*initiation, error) {
	return &initiation{secret: p.get(), time: now.Unix(), checkReply: func(*Message) error { return nil }}, nil
}

func (p *PSK) accept(m *Message, _ PeerConfig, now time.Time, _ authPolicy) (*acceptance, error) {
	if m.Time == 0 {
		return nil, fmt.Errorf("%w: PSK INIT without a time", ErrMalformed)
	}
	sent := time.Unix(m.Time, 0)
	if d := now.Sub(sent); d > p.maxSkew() || -d > p.maxSkew() {
		return nil, fmt.Errorf("%w: INIT sent at %v, our clock says %v (allowed skew %v)", ErrClockSkew, sent.UTC(), now.UTC(), p.maxSkew())
	}
	return &acceptance{
		secret:      p.get(),
		sent:        sent,
		replayKey:   "psk " + hex.EncodeToString(m.Nonce),
		replayUntil: sent.Add(p.maxSkew() + time.Second),
	}, nil
}

// identity binds MAC1 to the secret: without the PSK, no INIT gets past
// the cheap check.
func (p *PSK) identity(*PeerConfig) []byte {
	p.mu.RLock()
	id := p.id
	p.mu.RUnlock()
	if id != nil {
		return id
	}
	id = hkdfKey(p.get(), []byte(kdfLabel+" psk"), "identity", 32)
	p.mu.Lock()
	if p.id == nil {
		p.id = id
	}
	p.mu.Unlock()
	return id
}
