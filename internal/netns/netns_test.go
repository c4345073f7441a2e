package netns

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/testenv"
)

// TestPingOverVeth is the netns tier's smoke test: two namespaces joined by a
// veth ping each other over IPv4 and IPv6.
func TestPingOverVeth(t *testing.T) {
	testenv.RequireNetNS(t)
	testenv.RequireBinary(t, "ping", "iputils-ping")
	a, b := New(t, "a"), New(t, "b")
	MustVeth(t, a, "va", b, "vb")
	a.MustAddr(t, "va", "10.0.0.1/24")
	b.MustAddr(t, "vb", "10.0.0.2/24")
	a.MustAddr(t, "va", "fd00::a/64")
	b.MustAddr(t, "vb", "fd00::b/64")
	out := a.MustRun(t, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.0.0.2")
	if !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("ping: %s", out)
	}
	out = a.MustRun(t, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", "fd00::b")
	if !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("ping -6: %s", out)
	}
	// An unreachable address must fail: the check can tell success from failure.
	if _, err := a.Run("ping", "-c", "1", "-W", "1", "10.0.0.9"); err == nil {
		t.Fatal("ping to an absent host succeeded")
	}
}

// TestDoRunsInsideNamespace checks that Do switches namespace and back, and
// that Go sockets opened inside see the namespace's addresses.
func TestDoRunsInsideNamespace(t *testing.T) {
	testenv.RequireNetNS(t)
	a := New(t, "do")
	if err := a.Do(func() error {
		l, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			return err
		}
		return l.Close()
	}); err != nil {
		t.Fatal(err)
	}
	var inside, outside string
	a.Do(func() error { inside, _ = os.Readlink("/proc/thread-self/ns/net"); return nil })
	outside, _ = os.Readlink("/proc/self/ns/net")
	if inside == outside || inside == "" {
		t.Fatalf("Do ran in %q, the test process is in %q", inside, outside)
	}
}

// TestCleanupRemovesNamespaceAndProcesses checks Close stops started processes
// and removes the namespace.
func TestCleanupRemovesNamespaceAndProcesses(t *testing.T) {
	testenv.RequireNetNS(t)
	n, err := Create("cl")
	if err != nil {
		t.Fatal(err)
	}
	c, err := n.Start("sleep", "60")
	if err != nil {
		n.Close()
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/run/netns/" + n.Name); !os.IsNotExist(err) {
		t.Fatalf("namespace file still there: %v", err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for c.ProcessState == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if c.ProcessState == nil {
		t.Fatal("process started in the namespace still runs")
	}
}

// TestCleanupAfterPanic runs a test that panics in a child process and
// checks that the namespace it made is gone afterwards.
func TestCleanupAfterPanic(t *testing.T) {
	testenv.RequireNetNS(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperPanics$", "-test.v")
	cmd.Env = append(os.Environ(), "BTMM_NETNS_PANIC=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("helper did not panic:\n%s", out)
	}
	m := regexp.MustCompile(`NS=(\S+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("helper printed no namespace name:\n%s", out)
	}
	if _, err := os.Stat("/run/netns/" + string(m[1])); !os.IsNotExist(err) {
		t.Fatalf("namespace %s survived a panicking test: %v", m[1], err)
	}
}

func TestHelperPanics(t *testing.T) {
	if os.Getenv("BTMM_NETNS_PANIC") != "1" {
		return // only runs as TestCleanupAfterPanic's child
	}
	n := New(t, "p")
	fmt.Printf("NS=%s\n", n.Name)
	panic("deliberate panic to test cleanup")
}

// TestSweepRemovesDeadProcessesNamespaces: a namespace named for a process
// that no longer runs is removed; one of a live process is kept.
func TestSweepRemovesDeadProcessesNamespaces(t *testing.T) {
	testenv.RequireNetNS(t)
	c := exec.Command("true")
	if err := c.Run(); err != nil {
		t.Fatal(err)
	}
	dead, err := CreateNamed(fmt.Sprintf("btmm%d-swept", c.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	live := New(t, "kept")
	removed := Sweep()
	if !slices.Contains(removed, dead.Name) {
		t.Errorf("Sweep removed %q, not the dead process's %s", removed, dead.Name)
	}
	if slices.Contains(removed, live.Name) {
		t.Errorf("Sweep removed %s of a live process", live.Name)
	}
	if _, err := os.Stat("/run/netns/" + live.Name); err != nil {
		t.Errorf("live namespace gone: %v", err)
	}
}
