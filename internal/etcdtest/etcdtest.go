// Package etcdtest runs a real etcd cluster (Debian's etcd-server, etcd
// 3.4) for btmm's tests: one network namespace per site, each holding one
// etcd member, joined by a routing hub namespace where the test's clients
// live. A site can be partitioned from the other sites (nftables in its
// namespace, the hub still reaches it) and a member can be killed with
// SIGKILL and restarted. btmm-dnsd replicas run beside the members, one per
// site (Site.NS).
//
//	c := etcdtest.Start(t, 3)
//	c.Endpoints()        // "http://10.77.1.2:2379", ...
//	c.Kill(c.Leader(10 * time.Second)); c.Restart(2)
//	c.Partition(2); c.Heal(2)
//	c.Hub.Do(func() error { ... })   // sockets made here live in the hub
//
// Addresses: site i (1-based) is 10.77.i.2/24 behind the hub's 10.77.i.1;
// every namespace is private to the test, so these never meet the host's.
package etcdtest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/btmm/btmm/internal/netns"
	"github.com/btmm/btmm/internal/testenv"
)

// Cluster is a running etcd cluster.
type Cluster struct {
	t     testing.TB
	Hub   *netns.NS
	Sites []*Site
	bin   string
}

// Site is one namespace with one etcd member.
type Site struct {
	N    int // 1-based
	NS   *netns.NS
	Addr string // 10.77.N.2
	dir  string
	cmd  *exec.Cmd
}

// Endpoint is the member's client URL.
func (s *Site) Endpoint() string { return "http://" + s.Addr + ":2379" }

func (s *Site) peerURL() string { return "http://" + s.Addr + ":2380" }

// Start starts an n-member cluster and waits until it has a leader and
// every member answers. It needs root (netns tier) and etcd.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	testenv.RequireNetNS(t)
	bin := testenv.RequireBinary(t, "etcd", "etcd-server")
	testenv.RequireBinary(t, "nft", "nftables")
	c := &Cluster{t: t, Hub: netns.New(t, "hub"), bin: bin}
	if err := c.Hub.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		s := &Site{N: i, NS: netns.New(t, fmt.Sprintf("site%d", i)), Addr: fmt.Sprintf("10.77.%d.2", i), dir: t.TempDir()}
		netns.MustVeth(t, c.Hub, fmt.Sprintf("s%d", i), s.NS, "hub")
		c.Hub.MustAddr(t, fmt.Sprintf("s%d", i), fmt.Sprintf("10.77.%d.1/24", i))
		s.NS.MustAddr(t, "hub", s.Addr+"/24")
		s.NS.MustRoute(t, "default", fmt.Sprintf("10.77.%d.1", i), "hub")
		c.Sites = append(c.Sites, s)
	}
	for _, s := range c.Sites {
		c.start(s, "new")
	}
	c.WaitHealthy(60 * time.Second)
	return c
}

// Endpoints are all members' client URLs.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, s := range c.Sites {
		out = append(out, s.Endpoint())
	}
	return out
}

func (c *Cluster) start(s *Site, state string) {
	c.t.Helper()
	var initial []string
	for _, o := range c.Sites {
		initial = append(initial, fmt.Sprintf("m%d=%s", o.N, o.peerURL()))
	}
	cmd := s.NS.Command(context.Background(), c.bin,
		"--name", fmt.Sprintf("m%d", s.N),
		"--data-dir", filepath.Join(s.dir, "data"),
		"--listen-peer-urls", s.peerURL(),
		"--initial-advertise-peer-urls", s.peerURL(),
		"--listen-client-urls", s.Endpoint(),
		"--advertise-client-urls", s.Endpoint(),
		"--initial-cluster", strings.Join(initial, ","),
		"--initial-cluster-state", state,
		"--initial-cluster-token", filepath.Base(c.Hub.Name),
		"--heartbeat-interval", "100", "--election-timeout", "1000",
		"--logger", "zap", "--log-outputs", filepath.Join(s.dir, "etcd.log"))
	if err := s.NS.StartCmd(cmd); err != nil {
		c.t.Fatal(err)
	}
	s.cmd = cmd
}

// Kill kills member i (1-based) with SIGKILL.
func (c *Cluster) Kill(i int) {
	s := c.Sites[i-1]
	if s.cmd == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	s.cmd.Wait()
	s.cmd = nil
}

// Leader returns the site (1-based) whose member the running members
// report as their leader, waiting up to timeout for them to have one.
func (c *Cluster) Leader(timeout time.Duration) int {
	c.t.Helper()
	var eps []string
	for _, s := range c.Sites {
		if s.cmd != nil {
			eps = append(eps, s.Endpoint())
		}
	}
	deadline := time.Now().Add(timeout)
	var out string
	var err error
	for time.Now().Before(deadline) {
		out, err = c.Hub.Run("etcdctl", "--endpoints", strings.Join(eps, ","), "--dial-timeout", "1s",
			"--command-timeout", "2s", "endpoint", "status", "-w", "json")
		var st []struct {
			Endpoint string
			Status   struct {
				Header struct {
					MemberID uint64 `json:"member_id"`
				}
				Leader uint64
			}
		}
		if err == nil && json.Unmarshal([]byte(out), &st) == nil {
			for _, e := range st {
				if e.Status.Leader != 0 && e.Status.Header.MemberID == e.Status.Leader {
					for _, s := range c.Sites {
						if s.Endpoint() == e.Endpoint {
							return s.N
						}
					}
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.t.Fatalf("etcd cluster: no leader after %v: %v\n%s", timeout, err, out)
	return 0
}

// Restart starts a killed member again on its data directory.
func (c *Cluster) Restart(i int) { c.start(c.Sites[i-1], "existing") }

// Partition cuts site i off from every other site (both directions); the
// hub (the test's clients) still reaches it.
func (c *Cluster) Partition(i int) {
	c.t.Helper()
	s := c.Sites[i-1]
	var others []string
	for _, o := range c.Sites {
		if o != s {
			others = append(others, o.Addr)
		}
	}
	set := strings.Join(others, ", ")
	rules := fmt.Sprintf(`table inet etcdtest {
	chain in { type filter hook input priority 0; ip saddr { %s } drop; }
	chain out { type filter hook output priority 0; ip daddr { %s } drop; }
}
`, set, set)
	f := filepath.Join(s.dir, "partition.nft")
	if err := os.WriteFile(f, []byte(rules), 0o600); err != nil {
		c.t.Fatal(err)
	}
	s.NS.MustRun(c.t, "nft", "-f", f)
	// Established TCP connections are cut by the rules too.
}

// Heal undoes Partition.
func (c *Cluster) Heal(i int) {
	c.t.Helper()
	c.Sites[i-1].NS.MustRun(c.t, "nft", "delete", "table", "inet", "etcdtest")
}

// WaitHealthy waits until every running member reports healthy (a cluster
// with a leader answering a quorum read).
func (c *Cluster) WaitHealthy(timeout time.Duration) {
	c.t.Helper()
	var eps []string
	for _, s := range c.Sites {
		if s.cmd != nil {
			eps = append(eps, s.Endpoint())
		}
	}
	deadline := time.Now().Add(timeout)
	var out string
	var err error
	for time.Now().Before(deadline) {
		out, err = c.Hub.Run("etcdctl", "--endpoints", strings.Join(eps, ","), "--dial-timeout", "1s",
			"--command-timeout", "2s", "endpoint", "health")
		if err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.t.Fatalf("etcd cluster not healthy after %v: %v\n%s\n%s", timeout, err, out, c.Logs())
}

// Logs returns the tails of the members' logs (for failure messages).
func (c *Cluster) Logs() string {
	var b strings.Builder
	for _, s := range c.Sites {
		data, _ := os.ReadFile(filepath.Join(s.dir, "etcd.log"))
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		fmt.Fprintf(&b, "--- m%d (last lines)\n%s\n", s.N, strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	return b.String()
}

// DialHub opens a UDP or TCP socket in the hub namespace (the socket stays
// there whatever goroutine uses it).
func (c *Cluster) DialHub(network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := c.Hub.Do(func() error {
		var err error
		conn, err = net.DialTimeout(network, addr, 5*time.Second)
		return err
	})
	return conn, err
}
