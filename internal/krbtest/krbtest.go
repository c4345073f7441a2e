// Package krbtest runs a real MIT Kerberos 5 KDC (krb5kdc, RFC 4120) for
// tests: a fresh realm database in a temporary directory, a KDC listening on a
// free 127.0.0.1 port (UDP and TCP), principals and keytabs made with
// kadmin.local, and a matching krb5.conf for gokrb5 and for MIT's own tools.
//
// Start gates the test on root and on the krb5-kdc / krb5-admin-server
// packages (testenv.RequireBinary: skipped, or failed under BTMM_REQUIRE_ALL=1).
// Everything is removed at t.Cleanup.
package krbtest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/jcmturner/gokrb5/v8/config"
	"github.com/jcmturner/gokrb5/v8/keytab"
)

// Enctypes are the encryption types the test realm supports and krb5.conf
// permits (gokrb5's defaults omit 19/20, so they are listed explicitly).
const Enctypes = "aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96 aes256-cts-hmac-sha384-192 aes128-cts-hmac-sha256-128"

// KDC is a running krb5kdc with its own realm database.
type KDC struct {
	Realm    string
	Dir      string         // temporary directory holding the database, configs and keytabs
	Addr     netip.AddrPort // where the KDC listens (UDP and TCP)
	Also     []netip.Addr   // more addresses it listens on, at Addr's port (StartIn)
	Krb5Conf string         // path of the client krb5.conf (KRB5_CONFIG)
	KDCConf  string         // path of kdc.conf (KRB5_KDC_PROFILE)

	kdcBin, kdb5Util, kadmin string
	cmd                      *exec.Cmd
	done                     chan struct{} // closed when cmd has exited
	stderr                   *testenv.SyncBuffer
}

// Start creates realm (e.g. "EXAMPLE.TEST") in a temporary directory and
// starts krb5kdc on a free loopback port. The KDC is stopped at t.Cleanup.
func Start(t testing.TB, realm string) *KDC {
	t.Helper()
	return start(t, realm, nil, netip.MustParseAddr("127.0.0.1"), 0)
}

// StartIn starts the KDC inside network namespace ns, listening on addr:port
// (an address the namespace has, such as the lab's 11.0.0.1), so that hosts
// in other namespaces reach it. The database and configs stay in the test's
// temporary directory; kadmin.local works on them from the test as with Start.
// It also listens on the addresses also (an IPv6 one for IPv6-only hosts);
// krb5.conf names addr.
func StartIn(t testing.TB, realm string, ns *netns.NS, addr netip.Addr, port uint16, also ...netip.Addr) *KDC {
	t.Helper()
	return start(t, realm, ns, addr, port, also...)
}

func start(t testing.TB, realm string, ns *netns.NS, addr netip.Addr, port uint16, also ...netip.Addr) *KDC {
	t.Helper()
	testenv.RequireRoot(t)
	k := &KDC{
		Realm:    realm,
		Also:     also,
		Dir:      t.TempDir(),
		kdcBin:   testenv.RequireBinary(t, "krb5kdc", "krb5-kdc"),
		kdb5Util: testenv.RequireBinary(t, "kdb5_util", "krb5-kdc"),
		kadmin:   testenv.RequireBinary(t, "kadmin.local", "krb5-admin-server"),
	}
	// The database does not depend on the port: created once. The KDC is
	// then started on a free port, and on another one if that port was
	// taken between freePort and krb5kdc's bind (parallel tests: another
	// test's socket got it first; krb5kdc then exits "Address already in
	// use").
	k.KDCConf = filepath.Join(k.Dir, "kdc.conf")
	k.Krb5Conf = filepath.Join(k.Dir, "krb5.conf")
	k.Addr = netip.AddrPortFrom(addr, port)
	k.writeConfigs(t)
	if err := os.WriteFile(filepath.Join(k.Dir, "kadm5.acl"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := k.run(k.kdb5Util, "create", "-s", "-r", realm, "-P", "krbtest-master"); err != nil {
		t.Fatalf("krbtest: kdb5_util create: %v\n%s", err, out)
	}
	t.Cleanup(k.Stop)
	for attempt := 1; ; attempt++ {
		if port == 0 || attempt > 1 {
			p, err := pickPort()
			if err != nil {
				t.Fatalf("krbtest: %v", err)
			}
			k.Addr = netip.AddrPortFrom(addr, p)
			k.writeConfigs(t)
		}
		err := k.launch(ns)
		if err == nil {
			return k
		}
		if port != 0 || attempt == 5 || !strings.Contains(k.stderr.String(), "Address already in use") {
			t.Fatalf("krbtest: %v\n%s", err, k.stderr)
		}
		t.Logf("krbtest: port %d was taken, trying another (%v)", k.Addr.Port(), err)
	}
}

// writeConfigs writes krb5.conf and kdc.conf for k.Addr (and k.Also).
func (k *KDC) writeConfigs(t testing.TB) {
	t.Helper()
	if err := os.WriteFile(k.Krb5Conf, []byte(k.ClientConfig()), 0o644); err != nil {
		t.Fatal(err)
	}
	listen := k.Addr.String()
	for _, a := range k.Also {
		listen += ", " + netip.AddrPortFrom(a, k.Addr.Port()).String()
	}
	kdcConf := fmt.Sprintf(`[kdcdefaults]
 kdc_listen = %[1]s
 kdc_tcp_listen = %[1]s

[realms]
 %[2]s = {
  database_name = %[3]s/principal
  key_stash_file = %[3]s/stash
  acl_file = %[3]s/kadm5.acl
  max_life = 10h
  max_renewable_life = 1d
  supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal aes256-cts-hmac-sha384-192:normal aes128-cts-hmac-sha256-128:normal
 }

[logging]
 kdc = STDERR
`, listen, k.Realm, k.Dir)
	if err := os.WriteFile(k.KDCConf, []byte(kdcConf), 0o644); err != nil {
		t.Fatal(err)
	}
}

// launch starts krb5kdc on k.Addr and waits until it serves: its log says
// "commencing operation" (it has bound every socket) and a TCP connection
// to k.Addr succeeds. An early exit is an error at once.
func (k *KDC) launch(ns *netns.NS) error {
	k.stderr = &testenv.SyncBuffer{}
	args := []string{"-n", "-P", filepath.Join(k.Dir, "kdc.pid")}
	k.cmd = exec.Command(k.kdcBin, args...)
	if ns != nil {
		k.cmd = ns.Command(context.Background(), k.kdcBin, args...)
	}
	k.cmd.Env = k.env()
	k.cmd.Stderr = k.stderr
	k.cmd.Stdout = k.stderr
	k.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := k.cmd.Start(); err != nil {
		return fmt.Errorf("start krb5kdc: %w", err)
	}
	k.done = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { c.Wait(); close(done) }(k.cmd, k.done)
	deadline := time.Now().Add(60 * time.Second) // generous: a loaded machine or TCG
	dial := func() error {
		c, err := net.DialTimeout("tcp", k.Addr.String(), 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err
	}
	for {
		select {
		case <-k.done:
			return fmt.Errorf("krb5kdc exited (%v) before serving on %v", k.cmd.ProcessState, k.Addr)
		default:
		}
		var err error
		if !strings.Contains(k.stderr.String(), "commencing operation") {
			err = fmt.Errorf("no \"commencing operation\" in its log yet")
		} else if ns != nil {
			err = ns.Do(dial)
		} else {
			err = dial()
		}
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("krb5kdc not serving on %v after 60 s: %v", k.Addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ClientConfig returns the text of a krb5.conf that points at this KDC.
func (k *KDC) ClientConfig() string {
	return fmt.Sprintf(`[libdefaults]
 default_realm = %[1]s
 dns_lookup_kdc = false
 dns_lookup_realm = false
 rdns = false
 udp_preference_limit = 1465
 default_tkt_enctypes = %[3]s
 default_tgs_enctypes = %[3]s
 permitted_enctypes = %[3]s

[realms]
 %[1]s = {
  kdc = %[2]s
 }
`, k.Realm, k.Addr, Enctypes)
}

// Config returns the gokrb5 client configuration for this KDC.
func (k *KDC) Config(t testing.TB) *config.Config {
	t.Helper()
	c, err := config.NewFromString(k.ClientConfig())
	if err != nil {
		t.Fatalf("krbtest: parse krb5.conf: %v", err)
	}
	return c
}

// Kadmin runs one kadmin.local query (e.g. "addprinc -randkey host/a.example")
// against the realm database and returns its output.
func (k *KDC) Kadmin(t testing.TB, query string) string {
	t.Helper()
	out, err := k.run(k.kadmin, "-r", k.Realm, "-q", query)
	if err != nil {
		t.Fatalf("krbtest: kadmin.local -q %q: %v\n%s", query, err, out)
	}
	return out
}

// AddPrincipal creates principal with a random key; extra are kadmin addprinc
// options such as "-maxlife", "5 seconds".
func (k *KDC) AddPrincipal(t testing.TB, principal string, extra ...string) {
	t.Helper()
	q := "addprinc -randkey"
	for _, e := range extra {
		q += " " + quote(e)
	}
	out := k.Kadmin(t, q+" "+principal)
	if !strings.Contains(out, "created") {
		t.Fatalf("krbtest: addprinc %s: %s", principal, out)
	}
}

// Keytab writes the current keys of principals into a new keytab file named
// name in the KDC's directory and returns its path and parsed contents. Each
// call re-randomises the principals' keys (ktadd bumps the kvno), so a keytab
// made earlier for the same principal becomes stale — which is how a test
// makes a "wrong keytab".
func (k *KDC) Keytab(t testing.TB, name string, principals ...string) (string, *keytab.Keytab) {
	t.Helper()
	p := filepath.Join(k.Dir, name)
	k.Kadmin(t, "ktadd -k "+p+" "+strings.Join(principals, " "))
	kt, err := keytab.Load(p)
	if err != nil {
		t.Fatalf("krbtest: load keytab %s: %v", p, err)
	}
	return p, kt
}

// Stop kills the KDC (also done at t.Cleanup). Tests use it to simulate "KDC down".
func (k *KDC) Stop() {
	if k.cmd == nil || k.cmd.Process == nil {
		return
	}
	select {
	case <-k.done:
		return
	default:
	}
	syscall.Kill(-k.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-k.done:
	case <-time.After(2 * time.Second):
		syscall.Kill(-k.cmd.Process.Pid, syscall.SIGKILL)
		<-k.done
	}
}

// Log returns what the KDC printed so far (its log goes to stderr).
func (k *KDC) Log() string { return k.stderr.String() }

func (k *KDC) env() []string {
	return append(os.Environ(), "KRB5_CONFIG="+k.Krb5Conf, "KRB5_KDC_PROFILE="+k.KDCConf)
}

func (k *KDC) run(bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := exec.CommandContext(ctx, bin, args...)
	c.Env = k.env()
	out, err := c.CombinedOutput()
	return string(out), err
}

// pickPort is freePort; a test makes it return a taken port.
var pickPort = freePort

// freePort finds a port free for both UDP and TCP on 127.0.0.1.
func freePort() (uint16, error) {
	for range 20 {
		u, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("find free port: %w", err)
		}
		port := u.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		u.Close()
		if err != nil {
			continue
		}
		l.Close()
		return uint16(port), nil
	}
	return 0, fmt.Errorf("find free port: no port free for both UDP and TCP after 20 tries")
}

func quote(s string) string {
	if strings.ContainsAny(s, " \t\"") {
		return `"` + strings.ReplaceAll(s, `"`, `\"`) + `"`
	}
	return s
}
