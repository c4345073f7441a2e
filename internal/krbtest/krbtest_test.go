package krbtest

import (
	"net"
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

// TestPortTakenBeforeBind: the free port found is taken by someone else
// before krb5kdc binds it (parallel tests in one VM did that): Start tries
// another port instead of waiting 60 s on a KDC that exited.
func TestPortTakenBeforeBind(t *testing.T) {
	squat, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squat.Close()
	taken := uint16(squat.Addr().(*net.TCPAddr).Port)
	calls := 0
	pickPort = func() (uint16, error) {
		calls++
		if calls == 1 {
			return taken, nil
		}
		return freePort()
	}
	t.Cleanup(func() { pickPort = freePort })
	start := time.Now()
	k := Start(t, "KRBTEST.EXAMPLE")
	if k.Addr.Port() == taken || calls != 2 {
		t.Fatalf("KDC on port %d (the taken one is %d) after %d picks, want a second pick", k.Addr.Port(), taken, calls)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("start took %v: the exit on the taken port was not noticed", d)
	}
	k.AddPrincipal(t, "host/a.example")
	_, kt := k.Keytab(t, "a.keytab", "host/a.example")
	cl := client.NewWithKeytab("host/a.example", k.Realm, kt, k.Config(t), client.DisablePAFXFAST(true))
	if err := cl.Login(); err != nil {
		t.Fatalf("login against the KDC on its second port: %v\n%s", err, k.Log())
	}
}
