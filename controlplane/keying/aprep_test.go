package keying

import (
	"encoding/asn1"
	"testing"
	"time"

	"github.com/jcmturner/gokrb5/v8/config"
	"github.com/jcmturner/gokrb5/v8/crypto"
	"github.com/jcmturner/gokrb5/v8/iana/keyusage"
	"github.com/jcmturner/gokrb5/v8/iana/nametype"
	"github.com/jcmturner/gokrb5/v8/keytab"
	"github.com/jcmturner/gokrb5/v8/messages"
	"github.com/jcmturner/gokrb5/v8/types"
)

// TestAPRepEncoding builds an AP-REQ against a service keytab (no KDC: the
// ticket is minted with the service key), lets the responder accept it, and
// decodes the AP-REP it returns with Go's standard encoding/asn1 (not the
// gokrb5 fork that built it), checking RFC 4120 §5.5.2 field by field.
func TestAPRepEncoding(t *testing.T) {
	const realm = "EXAMPLE.TEST"
	kt := keytab.New()
	if err := kt.AddEntry("host/b.example.test", realm, "service password", time.Now(), 1, 18); err != nil {
		t.Fatal(err)
	}
	cname := types.NewPrincipalName(nametype.KRB_NT_PRINCIPAL, "host/a.example.test")
	sname := types.NewPrincipalName(nametype.KRB_NT_PRINCIPAL, "host/b.example.test")
	now := time.Now().UTC()
	tkt, sessionKey, err := messages.NewTicket(cname, realm, sname, realm, types.NewKrbFlags(), kt, 18, 1,
		now, now, now.Add(time.Hour), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	auth, err := types.NewAuthenticator(realm, cname)
	if err != nil {
		t.Fatal(err)
	}
	auth.CTime, auth.Cusec = now.Truncate(time.Second), 123456
	if err := auth.GenerateSeqNumberAndSubKey(18, 32); err != nil {
		t.Fatal(err)
	}
	req, err := messages.NewAPReq(tkt, sessionKey, auth)
	if err != nil {
		t.Fatal(err)
	}
	b, err := req.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	acc, err := (&Kerberos{Principal: "host/b.example.test@" + realm, Keytab: kt, Krb5Conf: config.New()}).accept(
		&Message{APReq: b}, PeerConfig{Name: "a", Principal: "host/a.example.test@" + realm}, now, authPolicy{})
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	if string(acc.secret) != string(auth.SubKey.KeyValue) {
		t.Error("the secret is not the authenticator's subkey")
	}

	// AP-REP ::= [APPLICATION 15] SEQUENCE { pvno [0] INTEGER (5), msg-type [1] INTEGER (15), enc-part [2] EncryptedData }
	var outer asn1.RawValue
	if rest, err := asn1.Unmarshal(acc.reply, &outer); err != nil || len(rest) != 0 {
		t.Fatalf("AP-REP outer: %v (rest %d)", err, len(rest))
	}
	if outer.Class != asn1.ClassApplication || outer.Tag != 15 {
		t.Fatalf("AP-REP tag: class %d tag %d, want application 15", outer.Class, outer.Tag)
	}
	type encryptedData struct {
		EType  int    `asn1:"explicit,tag:0"`
		KVNO   int    `asn1:"optional,explicit,tag:1"`
		Cipher []byte `asn1:"explicit,tag:2"`
	}
	var rep struct {
		PVNO    int           `asn1:"explicit,tag:0"`
		MsgType int           `asn1:"explicit,tag:1"`
		EncPart encryptedData `asn1:"explicit,tag:2"`
	}
	if _, err := asn1.Unmarshal(outer.Bytes, &rep); err != nil {
		t.Fatalf("AP-REP body: %v", err)
	}
	if rep.PVNO != 5 || rep.MsgType != 15 {
		t.Errorf("pvno %d msg-type %d, want 5 and 15", rep.PVNO, rep.MsgType)
	}
	ed := rep.EncPart
	if ed.EType != 18 {
		t.Errorf("enc-part etype %d, want 18 (the session key's)", ed.EType)
	}
	plain, err := crypto.DecryptMessage(ed.Cipher, sessionKey, keyusage.AP_REP_ENCPART)
	if err != nil {
		t.Fatalf("enc-part does not decrypt with the session key under key usage 12: %v", err)
	}
	// EncAPRepPart ::= [APPLICATION 27] SEQUENCE { ctime [0] KerberosTime, cusec [1] Microseconds,
	//                   subkey [2] EncryptionKey OPTIONAL, seq-number [3] UInt32 OPTIONAL }
	var inner asn1.RawValue
	if _, err := asn1.Unmarshal(plain, &inner); err != nil || inner.Class != asn1.ClassApplication || inner.Tag != 27 {
		t.Fatalf("EncAPRepPart tag: %v class %d tag %d, want application 27", err, inner.Class, inner.Tag)
	}
	var part struct {
		CTime time.Time `asn1:"generalized,explicit,tag:0"`
		Cusec int       `asn1:"explicit,tag:1"`
		Seq   int64     `asn1:"optional,explicit,tag:3"`
	}
	if _, err := asn1.Unmarshal(inner.Bytes, &part); err != nil {
		t.Fatalf("EncAPRepPart body: %v", err)
	}
	if !part.CTime.Equal(auth.CTime) || part.Cusec != 123456 || part.Seq != auth.SeqNumber {
		t.Errorf("EncAPRepPart echoes ctime %v cusec %d seq %d, want %v %d %d", part.CTime, part.Cusec, part.Seq, auth.CTime, 123456, auth.SeqNumber)
	}
	// And the initiator's check accepts it, but not for another authenticator.
	if err := checkAPRep(acc.reply, sessionKey, auth.CTime, auth.Cusec); err != nil {
		t.Errorf("checkAPRep: %v", err)
	}
	if err := checkAPRep(acc.reply, sessionKey, auth.CTime, auth.Cusec+1); err == nil {
		t.Error("checkAPRep accepted an AP-REP for another authenticator")
	}
}
