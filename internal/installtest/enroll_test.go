package installtest

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/jcmturner/gokrb5/v8/client"
	"github.com/jcmturner/gokrb5/v8/config"
	"github.com/jcmturner/gokrb5/v8/iana/nametype"
	"github.com/jcmturner/gokrb5/v8/keytab"
	"github.com/jcmturner/gokrb5/v8/types"

	"github.com/btmm/btmm/internal/krbtest"
	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// binaries returns a directory with btmm-dnsd and btmmctl: BTMM_BIN_DIR,
// else a fresh go build.
func binaries(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("BTMM_BIN_DIR"); d != "" {
		return d
	}
	_, file, _, _ := runtime.Caller(0)
	dir := t.TempDir()
	c := exec.Command("go", "build", "-o", dir+"/", "./cmd/btmm-dnsd", "./cmd/btmmctl")
	c.Dir = filepath.Join(filepath.Dir(file), "..", "..")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

// TestEnrollKerberos: `btmm-dnsd enroll -realm` makes the host's principal
// and keytab through kadmin (a real MIT KDC), `btmmctl enroll` installs the
// bundle, and the installed keytab logs in to the KDC as the host.
func TestEnrollKerberos(t *testing.T) {
	testenv.RequireNetNS(t)
	bins := binaries(t)
	const realm = "BTMM.EXAMPLE"
	ns := netns.New(t, "kdc")
	kdc := krbtest.StartIn(t, realm, ns, mustAddr("127.0.0.1"), 0)
	dir := t.TempDir()
	conf := filepath.Join(dir, "dnsd.toml")
	writeFile(t, conf, "zone = \"btmm.example.\"\nserver_addrs = [\"203.0.113.10\"]\nlisten = \"127.0.0.1:53\"\nlisten_tls = \"\"\ndata_dir = \""+dir+"/data\"\n", 0o644)
	dnsd := func(args ...string) (string, error) {
		c := exec.Command(filepath.Join(bins, "btmm-dnsd"), append([]string{"-config", conf}, args...)...)
		c.Env = append(os.Environ(), "KRB5_CONFIG="+kdc.Krb5Conf, "KRB5_KDC_PROFILE="+kdc.KDCConf)
		out, err := c.Output()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), &exitErr{err, string(ee.Stderr)}
		}
		return string(out), err
	}
	if _, err := dnsd("adduser", "alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := dnsd("enroll", "alice", "laptop"); err == nil || !strings.Contains(err.Error(), "no keying material") {
		t.Fatalf("enroll without keying: %v", err)
	}
	bundle, err := dnsd("enroll", "-realm", realm, "-kdc", kdc.Addr.String(), "alice", "laptop")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(bundle, "# btmm enrollment for laptop.alice.btmm.example") {
		t.Fatalf("bundle: %s", bundle)
	}
	bf := filepath.Join(dir, "laptop.bundle")
	writeFile(t, bf, bundle, 0o600)
	etc := filepath.Join(dir, "etc")
	if out, err := exec.Command(filepath.Join(bins, "btmmctl"), "enroll", "-dir", etc, bf).CombinedOutput(); err != nil {
		t.Fatalf("btmmctl enroll: %v\n%s", err, out)
	}
	kt, err := keytab.Load(filepath.Join(etc, "krb5.keytab"))
	if err != nil {
		t.Fatal(err)
	}
	const principal = "host/laptop.alice.btmm.example"
	if _, _, err := kt.GetEncryptionKey(principalName(principal), realm, 0, 18); err != nil {
		t.Fatalf("the installed keytab has no aes256 key for %s: %v", principal, err)
	}
	var login error
	ns.Do(func() error {
		cfg, err := config.Load(filepath.Join(etc, "krb5.conf")) // as btmmctl enroll wrote it
		if err != nil {
			login = err
			return nil
		}
		cl := client.NewWithKeytab(principal, realm, kt, cfg, client.DisablePAFXFAST(true))
		login = cl.Login()
		return nil
	})
	if login != nil {
		t.Fatalf("login with the enrolled keytab: %v", login)
	}
	key, _ := os.ReadFile(filepath.Join(etc, "btmm.key"))
	if !strings.Contains(string(key), `key "laptop.alice.btmm.example"`) {
		t.Fatalf("the host got no key of its own (addhost): %s", key)
	}
	// Enrolling again reuses the host key and re-keys the principal.
	if _, err := dnsd("enroll", "-realm", realm, "alice", "laptop"); err != nil {
		t.Fatalf("second enroll: %v", err)
	}
}

type exitErr struct {
	err    error
	stderr string
}

func (e *exitErr) Error() string { return e.err.Error() + ": " + e.stderr }

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func principalName(s string) types.PrincipalName {
	return types.NewPrincipalName(nametype.KRB_NT_PRINCIPAL, s)
}
