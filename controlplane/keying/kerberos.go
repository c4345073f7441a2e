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

	mu      sync.Mutex
	tgt     *ticket
	tickets map[string]*ticket // by service principal
}

type ticket struct {
	tkt        messages.Ticket
	key        types.EncryptionKey
	start, end time.Time
}

// fresh reports whether t is usable for a new exchange at now: it is
// replaced once 70% of its lifetime has passed, so that an SA keyed with it
// can be rekeyed (at 80%, see Agent) with a new ticket before it expires.
func (t *ticket) fresh(now time.Time) bool {
	if t == nil {
		return false
	}
	life := t.end.Sub(t.start)
	return now.After(t.start.Add(-time.Minute)) && now.Before(t.start.Add(life*7/10))
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

func (k *Kerberos) skew() time.Duration {
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

func (k *Kerberos) check() error {
	if k.keytab() == nil || k.Krb5Conf == nil || k.Principal == "" {
		return errors.New("kerberos keying needs Principal, Keytab and Krb5Conf")
	}
	return nil
}

// serviceTicket returns a fresh ticket for the peer's principal, logging in
// (AS exchange with the keytab) and asking the KDC (TGS exchange) as needed.
func (k *Kerberos) serviceTicket(spn string, now time.Time) (*ticket, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if t := k.tickets[spn]; t.fresh(now) {
		return t, nil
	}
	cname, realm := k.principal(k.Principal)
	cl := client.NewWithKeytab(cname.PrincipalNameString(), realm, k.keytab(), k.Krb5Conf, client.DisablePAFXFAST(true))
	if !k.tgt.fresh(now) {
		asReq, err := messages.NewASReqForTGT(realm, k.Krb5Conf, cname)
		if err != nil {
			return nil, fmt.Errorf("kerberos login as %s@%s: %w", cname.PrincipalNameString(), realm, err)
		}
		asRep, err := cl.ASExchange(realm, asReq, 0)
		if err != nil {
			return nil, classifyKerberos(fmt.Sprintf("kerberos login as %s@%s", cname.PrincipalNameString(), realm), err)
		}
		p := asRep.DecryptedEncPart
		k.tgt = &ticket{tkt: asRep.Ticket, key: p.Key, start: startOf(p), end: p.EndTime}
	}
	sname, srealm := k.principal(spn)
	_, tgsRep, err := cl.TGSREQGenerateAndExchange(sname, srealm, k.tgt.tkt, k.tgt.key, false)
	if err != nil {
		return nil, classifyKerberos(fmt.Sprintf("kerberos service ticket for %s@%s", sname.PrincipalNameString(), srealm), err)
	}
	p := tgsRep.DecryptedEncPart
	t := &ticket{tkt: tgsRep.Ticket, key: p.Key, start: startOf(p), end: p.EndTime}
	if k.tickets == nil {
		k.tickets = map[string]*ticket{}
	}
	k.tickets[spn] = t
	return t, nil
}

func startOf(p messages.EncKDCRepPart) time.Time {
	if p.StartTime.IsZero() {
		return p.AuthTime
	}
	return p.StartTime
}

func (k *Kerberos) initiate(_ context.Context, peer PeerConfig, now time.Time) (*initiation, error) {
	if err := k.check(); err != nil {
		return nil, err
	}
	if peer.Principal == "" {
		return nil, fmt.Errorf("peer %s: %w: no principal configured", peer.Name, ErrUnknownPrincipal)
	}
	t, err := k.serviceTicket(peer.Principal, now)
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
		secret:      auth.SubKey.KeyValue,
		ticketStart: t.start,
		ticketEnd:   t.end,
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
func (k *Kerberos) accept(m *Message, peer PeerConfig, now time.Time) (*acceptance, error) {
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
	if d := now.Sub(ct); d > k.skew() || -d > k.skew() {
		return nil, fmt.Errorf("%w: peer %s's clock says %v, ours %v (allowed %v)", ErrClockSkew, peer.Name, ct.UTC(), now.UTC(), k.skew())
	}
	start := tp.StartTime
	if start.IsZero() {
		start = tp.AuthTime
	}
	if start.Sub(now) > k.skew() || types.IsFlagSet(&tp.Flags, flags.Invalid) {
		return nil, fmt.Errorf("%w: ticket not valid before %v", ErrClockSkew, start.UTC())
	}
	if now.Sub(tp.EndTime) > k.skew() {
		return nil, fmt.Errorf("%w: ticket from %s@%s ended %v (now %v)", ErrTicketExpired, tp.CName.PrincipalNameString(), tp.CRealm, tp.EndTime.UTC(), now.UTC())
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
		reply:       rep,
		ticketStart: start,
		ticketEnd:   tp.EndTime,
		replayKey: fmt.Sprintf("krb %s@%s %s %d %d", tp.CName.PrincipalNameString(), tp.CRealm,
			req.Ticket.SName.PrincipalNameString(), ct.UnixNano(), a.SeqNumber),
		replayUntil: now.Add(2*k.skew() + time.Second),
	}, nil
}
