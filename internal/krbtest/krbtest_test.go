package krbtest

import (
	"strings"
	"testing"
	"time"

	"github.com/jcmturner/gokrb5/v8/client"
)

// TestKDCIssuesServiceTicket checks the helper end to end with gokrb5: log in
// from a keytab, get a service ticket, and see the KDC log the issue.
func TestKDCIssuesServiceTicket(t *testing.T) {
	k := Start(t, "KRBTEST.EXAMPLE")
	k.AddPrincipal(t, "host/a.example")
	k.AddPrincipal(t, "host/b.example", "-maxlife", "1 minute")
	_, kt := k.Keytab(t, "ab.keytab", "host/a.example", "host/b.example")
	cl := client.NewWithKeytab("host/a.example", k.Realm, kt, k.Config(t), client.DisablePAFXFAST(true))
	if err := cl.Login(); err != nil {
		t.Fatalf("login: %v\nKDC log:\n%s", err, k.Log())
	}
	tkt, key, err := cl.GetServiceTicket("host/b.example")
	if err != nil {
		t.Fatalf("service ticket: %v", err)
	}
	if tkt.SName.PrincipalNameString() != "host/b.example" || len(key.KeyValue) == 0 {
		t.Fatalf("ticket for %q, key %d bytes", tkt.SName.PrincipalNameString(), len(key.KeyValue))
	}
	for i := 0; i < 100 && !strings.Contains(k.Log(), "TGS_REQ"); i++ {
		time.Sleep(10 * time.Millisecond) // the KDC's log line may trail its reply
	}
	if !strings.Contains(k.Log(), "TGS_REQ") {
		t.Errorf("KDC log does not show the TGS_REQ:\n%s", k.Log())
	}
	k.Stop()
	cl2 := client.NewWithKeytab("host/a.example", k.Realm, kt, k.Config(t), client.DisablePAFXFAST(true))
	if err := cl2.Login(); err == nil {
		t.Fatal("login succeeded with the KDC stopped")
	}
}
