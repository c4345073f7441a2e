package keying

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jcmturner/gofork/encoding/asn1"
	"github.com/jcmturner/gokrb5/v8/asn1tools"
	"github.com/jcmturner/gokrb5/v8/client"
	"github.com/jcmturner/gokrb5/v8/config"
	"github.com/jcmturner/gokrb5/v8/crypto"
	"github.com/jcmturner/gokrb5/v8/iana/asnAppTag"
	"github.com/jcmturner/gokrb5/v8/iana/flags"
	"github.com/jcmturner/gokrb5/v8/iana/keyusage"
	"github.com/jcmturner/gokrb5/v8/iana/msgtype"
	"github.com/jcmturner/gokrb5/v8/iana/nametype"
	"github.com/jcmturner/gokrb5/v8/keytab"
	"github.com/jcmturner/gokrb5/v8/messages"
	"github.com/jcmturner/gokrb5/v8/types"
)

// Kerberos authenticates hosts with their host keytabs (RFC 4120 AP
// exchange, RFC 6281 §7.1): the initiator gets a service ticket for the
// peer's host principal and sends an AP-REQ with a fresh subkey; the
// responder verifies it with its own keytab and answers with an AP-REP
// (mutual authentication). The subkey is the secret the ESP keys come from.
//
// Every host uses one principal both as client (to get tickets) and as
// service (to accept them): host/<host>.<user domain>@REALM.
type Kerberos struct {
	// Principal is this host's principal, "host/a.example.com" or with
	// "@REALM"; without a realm, Realm or krb5.conf's default_realm is used.
	Principal string
	Realm     string
	Keytab    *keytab.Keytab
	Krb5Conf  *config.Config
	// MaxClockSkew is the accepted clock difference (default 5 min, as MIT).
	MaxClockSkew time.Duration

	ktMu sync.RWMutex // guards Keytab after the first exchange (SetKeytab)

	// mu guards the ticket cache and the fetches in flight; it is never
	// held across a KDC round trip, so one slow fetch stalls only the
	// exchanges that wait for that very ticket.
	mu       sync.Mutex
	tgt      *ticket
	tickets  map[string]*ticket // by service principal
	inflight map[string]*fetch  // by service principal; "" is the login (TGT)
	// subkeyHook, when set (tests), replaces the authenticator's random
	// subkey: forward secrecy must hold even when it repeats.
	subkeyHook func() []byte
}

type ticket struct {
	tkt        messages.Ticket
	key        types.EncryptionKey
	start, end time.Time
	auth       time.Time // the initial authentication (AS exchange) behind it
}

// fetch is one KDC round trip in flight; whoever needs its ticket waits on
// done (or gives up when their context ends).
type fetch struct {
	done chan struct{}
	t    *ticket
	err  error
}

// usable reports whether t may serve a new exchange at now: it is replaced
// once 70% of its lifetime has passed (so that an SA keyed with it can be
// rekeyed, at 80%, with a new one before it expires), and once half of
// maxAuthAge has passed since the login behind it (so a peer never refuses
// it as too old, and a deleted principal stops getting in: see
// authPolicy).
func (t *ticket) usable(now time.Time, maxAuthAge time.Duration) bool {
	if t == nil {
		return false
	}
	life := t.end.Sub(t.start)
	if !now.After(t.start.Add(-time.Minute)) || !now.Before(t.start.Add(life*7/10)) {
		return false
	}
	return maxAuthAge <= 0 || now.Sub(t.auth) < maxAuthAge/2
}

// Mode reports ModeKerberos.
func (k *Kerberos) Mode() Mode { return ModeKerberos }

// keytab returns the keytab in use.
func (k *Kerberos) keytab() *keytab.Keytab {
	k.ktMu.RLock()
	defer k.ktMu.RUnlock()
	return k.Keytab
}

// SetKeytab makes k use kt from the next exchange on (a keytab re-read on
// SIGHUP, e.g. after the host's key was changed with kadmin ktadd). Tickets
// already obtained stay valid until they expire.
func (k *Kerberos) SetKeytab(kt *keytab.Keytab) {
	k.ktMu.Lock()
	k.Keytab = kt
	k.ktMu.Unlock()
	k.mu.Lock()
	k.tgt = nil // the next TGT comes from the new key
	k.mu.Unlock()
}

// String names the principal; it never prints the keytab's keys.
func (k *Kerberos) String() string {
	n := 0
	if kt := k.keytab(); kt != nil {
		n = len(kt.Entries)
	}
	return fmt.Sprintf("kerberos(%s, keytab=[%d entries redacted])", k.Principal, n)
}

func (k *Kerberos) maxSkew() time.Duration {
	if k.MaxClockSkew > 0 {
		return k.MaxClockSkew
	}
	return 5 * time.Minute
}

// principal splits a principal string into name and realm, defaulting the realm.
func (k *Kerberos) principal(s string) (types.PrincipalName, string) {
	name, realm := s, ""
	if i := strings.LastIndexByte(s, '@'); i >= 0 {
		name, realm = s[:i], s[i+1:]
	}
	if realm == "" {
		realm = k.Realm
	}
	if realm == "" && k.Krb5Conf != nil {
		realm = k.Krb5Conf.LibDefaults.DefaultRealm
	}
	return types.NewPrincipalName(nametype.KRB_NT_PRINCIPAL, name), realm
}

// identity is the responder's principal, name@REALM.
func (k *Kerberos) identity(peer *PeerConfig) []byte {
	s := k.Principal
	if peer != nil {
		s = peer.Principal
	}
	n, r := k.principal(s)
	return []byte(n.PrincipalNameString() + "@" + strings.ToUpper(r))
}

func (k *Kerberos) check() error {
	if k.keytab() == nil || k.Krb5Conf == nil || k.Principal == "" {
		return errors.New("kerberos keying needs Principal, Keytab and Krb5Conf")
	}
	return nil
}

// once runs f for key unless a run for key is in flight, and waits for that
// run or for ctx. f runs on its own goroutine: a caller whose context ends
// returns at once (ErrKDCUnreachable wrapping the context's error), while
// the round trip finishes within gokrb5's own timeouts (5 s per KDC and
// transport) and its ticket is cached for the next caller.
func (k *Kerberos) once(ctx context.Context, key string, f func() (*ticket, error)) (*ticket, error) {
	k.mu.Lock()
	fl := k.inflight[key]
	if fl == nil {
		fl = &fetch{done: make(chan struct{})}
		if k.inflight == nil {
			k.inflight = map[string]*fetch{}
		}
		k.inflight[key] = fl
		go func() {
			t, err := f()
			k.mu.Lock()
			fl.t, fl.err = t, err
			delete(k.inflight, key)
			k.mu.Unlock()
			close(fl.done)
		}()
	}
	k.mu.Unlock()
	select {
	case <-fl.done:
		return fl.t, fl.err
	case <-ctx.Done():
		what := "login"
		if key != "" {
			what = "service ticket for " + key
		}
		return nil, fmt.Errorf("kerberos %s: %w: gave up waiting for the KDC: %w", what, ErrKDCUnreachable, ctx.Err())
	}
}

func (k *Kerberos) client() (*client.Client, types.PrincipalName, string) {
	cname, realm := k.principal(k.Principal)
	cl := client.NewWithKeytab(cname.PrincipalNameString(), realm, k.keytab(), k.Krb5Conf, client.DisablePAFXFAST(true))
	return cl, cname, realm
}

// login returns a TGT usable at now, logging in (AS exchange with the
// keytab) when the cached one is not.
func (k *Kerberos) login(ctx context.Context, now time.Time, maxAuthAge time.Duration) (*ticket, error) {
	k.mu.Lock()
	t := k.tgt
	k.mu.Unlock()
	if t.usable(now, maxAuthAge) {
		return t, nil
	}
	return k.once(ctx, "", func() (*ticket, error) {
		cl, cname, realm := k.client()
		asReq, err := messages.NewASReqForTGT(realm, k.Krb5Conf, cname)
		if err != nil {
			return nil, fmt.Errorf("kerberos login as %s@%s: %w", cname.PrincipalNameString(), realm, err)
		}
		asRep, err := cl.ASExchange(realm, asReq, 0)
		if err != nil {
			return nil, classifyKerberos(fmt.Sprintf("kerberos login as %s@%s", cname.PrincipalNameString(), realm), err)
		}
		p := asRep.DecryptedEncPart
		t := &ticket{tkt: asRep.Ticket, key: p.Key, start: startOf(p), end: p.EndTime, auth: p.AuthTime}
		k.mu.Lock()
		k.tgt = t
		k.mu.Unlock()
		return t, nil
	})
}

// serviceTicket returns a ticket for the peer's principal usable at now,
// logging in and asking the KDC (TGS exchange) as needed. Fetches for
// different peers run independently.
func (k *Kerberos) serviceTicket(ctx context.Context, spn string, now time.Time, maxAuthAge time.Duration) (*ticket, error) {
	k.mu.Lock()
	t := k.tickets[spn]
	k.mu.Unlock()
	if t.usable(now, maxAuthAge) {
		return t, nil
	}
	tgt, err := k.login(ctx, now, maxAuthAge)
	if err != nil {
		return nil, err
	}
	return k.once(ctx, spn, func() (*ticket, error) {
		cl, _, _ := k.client()
		sname, srealm := k.principal(spn)
		_, tgsRep, err := cl.TGSREQGenerateAndExchange(sname, srealm, tgt.tkt, tgt.key, false)
		if err != nil {
			return nil, classifyKerberos(fmt.Sprintf("kerberos service ticket for %s@%s", sname.PrincipalNameString(), srealm), err)
		}
		p := tgsRep.DecryptedEncPart
		t := &ticket{tkt: tgsRep.Ticket, key: p.Key, start: startOf(p), end: p.EndTime, auth: p.AuthTime}
		k.mu.Lock()
		if k.tickets == nil {
			k.tickets = map[string]*ticket{}
		}
		k.tickets[spn] = t
		k.mu.Unlock()
		return t, nil
	})
}

func startOf(p messages.EncKDCRepPart) time.Time {
	if p.StartTime.IsZero() {
		return p.AuthTime
	}
	return p.StartTime
}

func (k *Kerberos) initiate(ctx context.Context, peer PeerConfig, now time.Time, pol authPolicy) (*initiation, error) {
	if err := k.check(); err != nil {
		return nil, err
	}
	if peer.Principal == "" {
		return nil, fmt.Errorf("peer %s: %w: no principal configured", peer.Name, ErrUnknownPrincipal)
	}
	t, err := k.serviceTicket(ctx, peer.Principal, now, pol.maxAuthAge)
	if err != nil {
		return nil, err
	}
	cname, realm := k.principal(k.Principal)
	auth, err := types.NewAuthenticator(realm, cname)
	if err != nil {
		return nil, fmt.Errorf("kerberos authenticator: %w", err)
	}
	// The authenticator's time is our clock (RFC 4120 §5.5.1), microseconds.
	now = now.UTC()
	auth.CTime = now.Truncate(time.Second)
	auth.Cusec = now.Nanosecond() / 1000
	et, err := crypto.GetEtype(t.key.KeyType)
	if err != nil {
		return nil, fmt.Errorf("kerberos session key type %d: %w", t.key.KeyType, err)
	}
	if err := auth.GenerateSeqNumberAndSubKey(t.key.KeyType, et.GetKeyByteSize()); err != nil {
		return nil, fmt.Errorf("kerberos subkey: %w", err)
	}
	if k.subkeyHook != nil {
		auth.SubKey.KeyValue = k.subkeyHook()
	}
	apReq, err := messages.NewAPReq(t.tkt, t.key, auth)
	if err != nil {
		return nil, fmt.Errorf("kerberos AP-REQ: %w", err)
	}
	types.SetFlag(&apReq.APOptions, flags.APOptionMutualRequired)
	b, err := apReq.Marshal()
	if err != nil {
		return nil, fmt.Errorf("kerberos AP-REQ: %w", err)
	}
	sessionKey := t.key
	ctime, cusec := auth.CTime, auth.Cusec
	return &initiation{
		token:       b,
		secret:      bytes.Clone(auth.SubKey.KeyValue),
		owned:       true,
		ticketStart: t.start,
		ticketEnd:   t.end,
		authTime:    t.auth,
		checkReply: func(m *Message) error {
			return checkAPRep(m.APRep, sessionKey, ctime, cusec)
		},
	}, nil
}

// checkAPRep verifies the responder's KRB_AP_REP: it must decrypt with the
// ticket's session key and echo our authenticator's time (RFC 4120 §3.2.5).
func checkAPRep(b []byte, key types.EncryptionKey, ctime time.Time, cusec int) error {
	if len(b) == 0 {
		return fmt.Errorf("%w: RESP without AP-REP (mutual authentication required)", ErrTampered)
	}
	var rep messages.APRep
	if err := rep.Unmarshal(b); err != nil {
		return fmt.Errorf("%w: AP-REP: %v", ErrTampered, err)
	}
	plain, err := crypto.DecryptEncPart(rep.EncPart, key, keyusage.AP_REP_ENCPART)
	if err != nil {
		return fmt.Errorf("%w: AP-REP does not decrypt with the session key: %v", ErrTampered, err)
	}
	var enc messages.EncAPRepPart
	if err := enc.Unmarshal(plain); err != nil {
		return fmt.Errorf("%w: AP-REP encrypted part: %v", ErrTampered, err)
	}
	if !enc.CTime.Truncate(time.Second).Equal(ctime.Truncate(time.Second)) || enc.Cusec != cusec {
		return fmt.Errorf("%w: AP-REP echoes another authenticator's time", ErrTampered)
	}
	return nil
}

// buildAPRep makes the KRB_AP_REP for an accepted AP-REQ: EncAPRepPart
// (application tag 27) with the authenticator's ctime/cusec, encrypted in the
// ticket session key with key usage 12, inside AP-REP (application tag 15).
func buildAPRep(req *messages.APReq) ([]byte, error) {
	enc := messages.EncAPRepPart{
		CTime:          req.Authenticator.CTime,
		Cusec:          req.Authenticator.Cusec,
		SequenceNumber: req.Authenticator.SeqNumber,
	}
	b, err := asn1.Marshal(enc)
	if err != nil {
		return nil, fmt.Errorf("AP-REP encrypted part: %w", err)
	}
	b = asn1tools.AddASNAppTag(b, asnAppTag.EncAPRepPart)
	ed, err := crypto.GetEncryptedData(b, req.Ticket.DecryptedEncPart.Key, keyusage.AP_REP_ENCPART, 0)
	if err != nil {
		return nil, fmt.Errorf("AP-REP encrypt: %w", err)
	}
	rep := messages.APRep{PVNO: 5, MsgType: msgtype.KRB_AP_REP, EncPart: ed}
	rb, err := asn1.Marshal(rep)
	if err != nil {
		return nil, fmt.Errorf("AP-REP: %w", err)
	}
	return asn1tools.AddASNAppTag(rb, asnAppTag.APREP), nil
}

// accept verifies an AP-REQ the way MIT's krb5_rd_req does, with our clock:
// the ticket must be for our principal and decrypt with our keytab, the
// authenticator must decrypt with the ticket's session key and name the
// ticket's client, that client must be the peer's configured principal, the
// authenticator must be within the clock skew, and the ticket valid now.
func (k *Kerberos) accept(m *Message, peer PeerConfig, now time.Time, pol authPolicy) (*acceptance, error) {
	if err := k.check(); err != nil {
		return nil, err
	}
	if len(m.APReq) == 0 {
		return nil, fmt.Errorf("%w: Kerberos INIT without AP-REQ", ErrMalformed)
	}
	var req messages.APReq
	if err := req.Unmarshal(m.APReq); err != nil {
		return nil, fmt.Errorf("%w: AP-REQ: %v", ErrMalformed, err)
	}
	us, realm := k.principal(k.Principal)
	if !req.Ticket.SName.Equal(us) || !strings.EqualFold(req.Ticket.Realm, realm) {
		return nil, fmt.Errorf("%w: ticket is for %s@%s, this host is %s@%s", ErrUnknownPrincipal,
			req.Ticket.SName.PrincipalNameString(), req.Ticket.Realm, us.PrincipalNameString(), realm)
	}
	if err := req.Ticket.DecryptEncPart(k.keytab(), &us); err != nil {
		return nil, fmt.Errorf("%w: cannot decrypt the ticket for %s (kvno %d) with our keytab: %v", ErrWrongKeytab,
			us.PrincipalNameString(), req.Ticket.EncPart.KVNO, err)
	}
	tp := req.Ticket.DecryptedEncPart
	if err := req.DecryptAuthenticator(tp.Key); err != nil {
		return nil, fmt.Errorf("%w: authenticator does not decrypt with the ticket's session key", ErrTampered)
	}
	a := req.Authenticator
	if !a.CName.Equal(tp.CName) || !strings.EqualFold(a.CRealm, tp.CRealm) {
		return nil, fmt.Errorf("%w: authenticator names %s, ticket %s", ErrTampered, a.CName.PrincipalNameString(), tp.CName.PrincipalNameString())
	}
	want, wantRealm := k.principal(peer.Principal)
	if !tp.CName.Equal(want) || !strings.EqualFold(tp.CRealm, wantRealm) {
		return nil, fmt.Errorf("%w: peer %s (%v) authenticated as %s@%s, expected %s@%s", ErrUnknownPrincipal, peer.Name, peer.ULA,
			tp.CName.PrincipalNameString(), tp.CRealm, want.PrincipalNameString(), wantRealm)
	}
	ct := a.CTime.Add(time.Duration(a.Cusec) * time.Microsecond)
	if d := now.Sub(ct); d > k.maxSkew() || -d > k.maxSkew() {
		return nil, fmt.Errorf("%w: peer %s's clock says %v, ours %v (allowed %v)", ErrClockSkew, peer.Name, ct.UTC(), now.UTC(), k.maxSkew())
	}
	start := tp.StartTime
	if start.IsZero() {
		start = tp.AuthTime
	}
	if start.Sub(now) > k.maxSkew() || types.IsFlagSet(&tp.Flags, flags.Invalid) {
		return nil, fmt.Errorf("%w: ticket not valid before %v", ErrClockSkew, start.UTC())
	}
	if now.Sub(tp.EndTime) > k.maxSkew() {
		return nil, fmt.Errorf("%w: ticket from %s@%s ended %v (now %v)", ErrTicketExpired, tp.CName.PrincipalNameString(), tp.CRealm, tp.EndTime.UTC(), now.UTC())
	}
	if pol.maxAuthAge > 0 && now.Sub(tp.AuthTime) > pol.maxAuthAge+k.maxSkew() {
		return nil, fmt.Errorf("%w: %s@%s last logged in at %v, more than the hard SA lifetime (%v) ago; a host that can still log in does so every %v",
			ErrTicketExpired, tp.CName.PrincipalNameString(), tp.CRealm, tp.AuthTime.UTC(), pol.maxAuthAge, pol.maxAuthAge/2)
	}
	if a.SubKey.KeyType == 0 || len(a.SubKey.KeyValue) < 16 {
		return nil, fmt.Errorf("%w: AP-REQ without a subkey", ErrMalformed)
	}
	rep, err := buildAPRep(&req)
	if err != nil {
		return nil, err
	}
	return &acceptance{
		secret:      bytes.Clone(a.SubKey.KeyValue),
		owned:       true,
		reply:       rep,
		ticketStart: start,
		ticketEnd:   tp.EndTime,
		authTime:    tp.AuthTime,
		sent:        ct,
		replayKey: fmt.Sprintf("krb %s@%s %s %d %d", tp.CName.PrincipalNameString(), tp.CRealm,
			req.Ticket.SName.PrincipalNameString(), ct.UnixNano(), a.SeqNumber),
		replayUntil: now.Add(2*k.maxSkew() + time.Second),
	}, nil
}
