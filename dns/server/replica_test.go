package server_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/btmm/btmm/dns/llqclient"
	"github.com/btmm/btmm/dns/register"
	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/internal/etcdtest"
	"github.com/miekg/dns"
)

// TestMain lets this test binary double as an agent (the real llqclient)
// run in the hub namespace by the replica tests.
func TestMain(m *testing.M) {
	if os.Getenv("BTMM_AGENT_HELPER") == "1" {
		os.Exit(agentMain())
	}
	os.Exit(m.Run())
}

// agentMain watches $NAME AAAA with llqclient (discovering the server by
// SRV through $RESOLVER, or at $SERVER) over TLS ($CAFILE), or over UDP
// without it (LLQ lease $LEASE), and prints "server ADDR"
// when it (re)connects and "answer V1,V2" after every change.
func agentMain() int {
	key, err := register.NewKey(os.Getenv("KEYNAME"), os.Getenv("KEYALG"), os.Getenv("KEYSECRET"))
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	var tlsCfg *tls.Config // no CAFILE: LLQs over UDP
	if f := os.Getenv("CAFILE"); f != "" {
		pemData, err := os.ReadFile(f)
		if err != nil {
			fmt.Println("error", err)
			return 1
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pemData)
		tlsCfg = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	lease, _ := time.ParseDuration(os.Getenv("LEASE")) // 0: the default
	var mu sync.Mutex
	say := func(s string) { mu.Lock(); fmt.Println(s); mu.Unlock() }
	c, err := llqclient.New(llqclient.Config{Server: os.Getenv("SERVER"), Domain: "alice.btmm.example.",
		Resolver: os.Getenv("RESOLVER"), Key: key, TLS: tlsCfg, Lease: lease,
		Timeout: 500 * time.Millisecond}, nil)
	if err != nil {
		say("error " + err.Error())
		return 1
	}
	c.Watch(os.Getenv("NAME"), dns.TypeAAAA, func(rrs []dns.RR) {
		var v []string
		for _, rr := range rrs {
			if a, ok := rr.(*dns.AAAA); ok {
				v = append(v, a.AAAA.String())
			}
		}
		slices.Sort(v)
		say("answer " + strings.Join(v, ","))
	})
	go func() {
		last := ""
		for range time.Tick(50 * time.Millisecond) {
			if st := c.Status(); st.Server != last && len(st.Queries) > 0 && st.Queries[0].Mode == llqclient.ModeLLQ {
				last = st.Server
				say("server " + last)
			}
		}
	}()
	ctx, stop := context.WithCancel(context.Background())
	go func() { bufio.NewReader(os.Stdin).ReadString('\n'); stop() }() // parent gone: stop
	c.Run(ctx)
	return 0
}

// testCA signs the replicas' DoT certificates (name and IP address).
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "btmm test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes a certificate for name and ip into dir; it returns the files.
func (ca *testCA) issue(t testing.TB, dir, name, ip string) (string, string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		DNSNames: []string{strings.TrimSuffix(name, ".")}, IPAddresses: []net.IP{net.ParseIP(ip)},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	cf, kf := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cf, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(kf, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return cf, kf
}

// replica is one btmm-dnsd process in an etcd site's namespace.
type replica struct {
	t    testing.TB
	c    *etcdtest.Cluster
	site *etcdtest.Site
	bin  string
	conf string
	addr string // UDP/TCP
	tls  string
	cmd  *exec.Cmd
}

func startReplicas(t testing.TB, c *etcdtest.Cluster, bin string, k tsig.Key, ca *testCA) []*replica {
	return startServers(t, c, bin, []tsig.Key{k}, ca, "etcd", "53", "853")
}

// startServers starts one btmm-dnsd per site with the given store (the
// embedded one listens on the given ports too) and users.
func startServers(t testing.TB, c *etcdtest.Cluster, bin string, keys []tsig.Key, ca *testCA, st, port, tlsPort string) []*replica {
	var out []*replica
	for _, s := range c.Sites {
		dir := t.TempDir()
		cf, kf := ca.issue(t, dir, fmt.Sprintf("ns%d.btmm.example.", s.N), s.Addr)
		r := &replica{t: t, c: c, site: s, bin: bin, conf: filepath.Join(dir, "dnsd.toml"),
			addr: net.JoinHostPort(s.Addr, port), tls: net.JoinHostPort(s.Addr, tlsPort)}
		for _, k := range keys {
			if err := server.NewUsers(filepath.Join(dir, "data"), zoneName).Install(k); err != nil {
				t.Fatal(err)
			}
		}
		os.WriteFile(r.conf, []byte(fmt.Sprintf(`zone = "btmm.example."
server_name = "ns%d.btmm.example."
server_addrs = [%q]
data_dir = %q
listen = %q
listen_tls = %q
tls_cert = %q
tls_key = %q
store = %q
[etcd]
endpoints = ["%s"]
request_timeout = "5s"
session_ttl = "2s"
[update_lease]
min = "1s"
[llq]
min_lease = "2s"
[limits]
updates_per_second = 1000
update_burst = 1000
`, s.N, s.Addr, filepath.Join(dir, "data"), r.addr, r.tls, cf, kf, st, strings.Join(c.Endpoints(), `", "`))), 0o644)
		r.start()
		out = append(out, r)
		if st == "embedded" {
			return out // one embedded server is enough
		}
	}
	// Every replica lists all three in the discovery SRVs.
	deadline := time.Now().Add(20 * time.Second)
	for _, r := range out {
		for {
			m := new(dns.Msg)
			m.SetQuestion("_dns-llq-tls._tcp."+keys[0].Name, dns.TypeSRV)
			resp, err := hubExchange(c, m, r.addr, nil)
			if err == nil && len(resp.Answer) == len(out) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("replica %s does not list every replica: %v %v", r.addr, resp, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return out
}

// replicaStartTimeout bounds a replica's start (BenchmarkManyHosts loads
// 400,000 records and raises it).
var replicaStartTimeout = 30 * time.Second

func (r *replica) start() {
	r.t.Helper()
	cmd := r.site.NS.Command(context.Background(), r.bin, "-config", r.conf)
	if testing.Verbose() {
		cmd.Stderr = os.Stderr
	}
	if err := r.site.NS.StartCmd(cmd); err != nil {
		r.t.Fatal(err)
	}
	r.cmd = cmd
	deadline := time.Now().Add(replicaStartTimeout)
	var resp *dns.Msg
	var err error
	for time.Now().Before(deadline) {
		m := new(dns.Msg)
		m.SetQuestion(zoneName, dns.TypeSOA)
		if resp, err = hubExchangeTimeout(r.c, m, r.addr, nil, 250*time.Millisecond); err == nil && resp.Rcode == dns.RcodeSuccess {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	dig, _ := r.c.Hub.Run("dig", "+time=2", "+tries=1", "@"+r.site.Addr, zoneName, "SOA")
	ss, _ := r.site.NS.Run("ss", "-ulnp")
	r.t.Fatalf("replica %s did not come up: %v %v\n%s\n%s", r.addr, resp, err, dig, ss)
}

func (r *replica) kill9() {
	syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
	r.cmd.Wait()
}

// hubExchange sends m (signed with k when given) to addr from the hub.
func hubExchange(c *etcdtest.Cluster, m *dns.Msg, addr string, k *tsig.Key) (*dns.Msg, error) {
	return hubExchangeTimeout(c, m, addr, k, 8*time.Second)
}

func hubExchangeTimeout(c *etcdtest.Cluster, m *dns.Msg, addr string, k *tsig.Key, timeout time.Duration) (*dns.Msg, error) {
	var resp *dns.Msg
	err := c.Hub.Do(func() error {
		cl := &dns.Client{Timeout: timeout}
		if k != nil {
			cl.TsigProvider = k.Provider()
			m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
		}
		var err error
		resp, _, err = cl.Exchange(m, addr)
		return err
	})
	return resp, err
}

// setAAAA replaces name's AAAA RRset at replica addr; with prereq, only if
// the RRset is exactly that address (compare-and-set).
func setAAAA(c *etcdtest.Cluster, k tsig.Key, addr, name, prereq, value string) (int, error) {
	m := new(dns.Msg)
	m.SetUpdate(zoneName)
	if prereq != "" {
		p, _ := dns.NewRR(name + " 0 IN AAAA " + prereq)
		m.Used([]dns.RR{p})
	}
	m.RemoveRRset([]dns.RR{&dns.AAAA{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET}}})
	add, _ := dns.NewRR(name + " 60 IN AAAA " + value)
	m.Insert([]dns.RR{add})
	m.SetEdns0(1232, false)
	m.IsEdns0().Option = append(m.IsEdns0().Option, &dns.EDNS0_UL{Code: dns.EDNS0UL, Lease: 7200})
	resp, err := hubExchange(c, m, addr, &k)
	if err != nil {
		return -1, err
	}
	return resp.Rcode, nil
}

// agent is the helper process running the real llqclient.
type agent struct {
	cmd   *exec.Cmd
	lines chan string
}

func startAgent(t *testing.T, c *etcdtest.Cluster, k tsig.Key, caFile, name string, env ...string) *agent {
	cmd := c.Hub.Command(context.Background(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BTMM_AGENT_HELPER=1", "KEYNAME="+k.Name, "KEYALG="+k.Algorithm,
		"KEYSECRET="+base64.StdEncoding.EncodeToString(k.Secret), "CAFILE="+caFile, "NAME="+name)
	cmd.Env = append(cmd.Env, env...)
	out, _ := cmd.StdoutPipe()
	in, _ := cmd.StdinPipe()
	if err := c.Hub.StartCmd(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close() })
	a := &agent{cmd: cmd, lines: make(chan string, 100)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			a.lines <- sc.Text()
		}
		close(a.lines)
	}()
	return a
}

// expect waits for a line with the prefix; it returns the rest.
func (a *agent) expect(t *testing.T, prefix string, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-a.lines:
			if !ok {
				t.Fatalf("agent exited waiting for %q", prefix)
			}
			if rest, ok := strings.CutPrefix(l, prefix); ok {
				return rest
			}
		case <-deadline:
			t.Fatalf("agent: no %q within %v", prefix, timeout)
		}
	}
}

// TestReplicas runs three btmm-dnsd replicas on a three-member etcd
// cluster, each replica and member in its own site namespace, and agents
// (the real llqclient) in the hub.
func TestReplicas(t *testing.T) {
	bin := buildDaemon(t)
	c := etcdtest.Start(t, 3)
	k, err := tsig.NewKey("alice.btmm.example.", "")
	if err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, ca.pem, 0o644)
	reps := startReplicas(t, c, bin, k, ca)
	a, b, cc := reps[0], reps[1], reps[2]
	put := func(r *replica, name, v string) {
		t.Helper()
		if rc, err := setAAAA(c, k, r.addr, name, "", v); err != nil || rc != dns.RcodeSuccess {
			t.Fatalf("update at %s: %s %v", r.addr, dns.RcodeToString[rc], err)
		}
	}

	t.Run("update at A, LLQ event at C", func(t *testing.T) {
		ag := startAgent(t, c, k, caFile, "x.alice.btmm.example.", "SERVER="+cc.tls)
		ag.expect(t, "answer ", 20*time.Second) // the setup's (empty) answer
		put(a, "x.alice.btmm.example.", "fd00::a")
		if got := ag.expect(t, "answer ", 10*time.Second); got != "fd00::a" {
			t.Fatalf("event at C: %q", got)
		}
	})

	t.Run("replica killed, agents move on", func(t *testing.T) {
		// Discovery through C finds A first (SRVs in name order). The TLS
		// agent notices A's death when its connection breaks; the UDP
		// agent (8 s LLQ lease) when its next refresh (at about half the
		// lease) goes unanswered.
		ag := startAgent(t, c, k, caFile, "y.alice.btmm.example.", "RESOLVER="+cc.addr)
		ug := startAgent(t, c, k, "", "y.alice.btmm.example.", "RESOLVER="+cc.addr, "LEASE=8s")
		if s := ag.expect(t, "server ", 20*time.Second); s != a.tls {
			t.Fatalf("TLS agent on %s, want A (%s)", s, a.tls)
		}
		if s := ug.expect(t, "server ", 20*time.Second); s != a.addr {
			t.Fatalf("UDP agent on %s, want A (%s)", s, a.addr)
		}
		put(b, "y.alice.btmm.example.", "fd00::1")
		for ag.expect(t, "answer ", 10*time.Second) != "fd00::1" {
		}
		for ug.expect(t, "answer ", 10*time.Second) != "fd00::1" {
		}
		a.kill9()
		if s := ag.expect(t, "server ", 30*time.Second); s == a.tls {
			t.Fatalf("TLS agent back on the killed replica")
		}
		if s := ug.expect(t, "server ", 30*time.Second); s == a.addr {
			t.Fatalf("UDP agent back on the killed replica")
		}
		put(b, "y.alice.btmm.example.", "fd00::2")
		for ag.expect(t, "answer ", 10*time.Second) != "fd00::2" {
		}
		for ug.expect(t, "answer ", 10*time.Second) != "fd00::2" {
		}
		a.start()
	})

	t.Run("lease expiry by the elected replica, seen everywhere", func(t *testing.T) {
		ag := startAgent(t, c, k, caFile, "short.alice.btmm.example.", "SERVER="+b.tls)
		ag.expect(t, "answer ", 20*time.Second)
		m := new(dns.Msg)
		m.SetUpdate(zoneName)
		add, _ := dns.NewRR("short.alice.btmm.example. 60 IN AAAA fd00::5")
		m.Insert([]dns.RR{add})
		m.SetEdns0(1232, false)
		m.IsEdns0().Option = append(m.IsEdns0().Option, &dns.EDNS0_UL{Code: dns.EDNS0UL, Lease: 1})
		if resp, err := hubExchange(c, m, cc.addr, &k); err != nil || resp.Rcode != dns.RcodeSuccess {
			t.Fatalf("update with a 1 s lease: %v %v", resp, err)
		}
		if got := ag.expect(t, "answer ", 10*time.Second); got != "fd00::5" {
			t.Fatalf("answer %q", got)
		}
		// Removed when the lease ends, whichever replica expires it.
		if got := ag.expect(t, "answer ", 20*time.Second); got != "" {
			t.Fatalf("after expiry: %q", got)
		}
		for _, r := range reps {
			q := new(dns.Msg)
			q.SetQuestion("short.alice.btmm.example.", dns.TypeAAAA)
			if resp, err := hubExchange(c, q, r.addr, &k); err != nil || len(resp.Answer) != 0 {
				t.Fatalf("replica %s after expiry: %v %v", r.addr, resp, err)
			}
		}
	})

	t.Run("etcd leader killed, updates continue", func(t *testing.T) {
		// The survivors elect a new leader within about two election
		// timeouts (1s each here); an update sent meanwhile waits for it
		// (request_timeout 5s) and is acknowledged: no SERVFAIL.
		dead := c.Leader(10 * time.Second)
		c.Kill(dead)
		for i := range 9 {
			put(reps[i%3], "z.alice.btmm.example.", fmt.Sprintf("fd00::%d", i+10))
		}
		for _, r := range reps {
			q := new(dns.Msg)
			q.SetQuestion("z.alice.btmm.example.", dns.TypeAAAA)
			deadline := time.Now().Add(10 * time.Second)
			for {
				resp, err := hubExchange(c, q, r.addr, &k)
				if err == nil && len(resp.Answer) == 1 && resp.Answer[0].(*dns.AAAA).AAAA.String() == "fd00::18" {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("replica %s after the updates: %v %v", r.addr, resp, err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		c.Restart(dead)
		c.WaitHealthy(30 * time.Second)
	})

	t.Run("minority partition, linearizable history", func(t *testing.T) {
		partitionHistory(t, c, k, reps)
	})
}

// regIn / regOut are the operations of a single AAAA register: a write, a
// compare-and-set (prerequisite on the value) and the final read.
type regIn struct {
	op       string // "put", "cas", "read"
	old, new string
}

type regOut struct {
	ok      bool   // put/cas acknowledged (NOERROR); cas false: prerequisite failed
	unknown bool   // SERVFAIL or no answer: may or may not have happened
	value   string // read
}

var registerModel = porcupine.Model{
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		s, in, out := state.(string), input.(regIn), output.(regOut)
		switch in.op {
		case "put":
			if out.unknown {
				return true, in.new // only linearized if it took effect; else omitted by the checker
			}
			return out.ok, in.new
		case "cas":
			if out.unknown {
				if s == in.old {
					return true, in.new
				}
				return true, s
			}
			if out.ok {
				return s == in.old, in.new
			}
			return s != in.old, s
		default:
			return out.value == s, s
		}
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(regIn), output.(regOut)
		return fmt.Sprintf("%s(%s,%s) -> %+v", in.op, in.old, in.new, out)
	},
}

// partitionHistory: three clients, one per replica, write and CAS one name
// while site 3 (replica C with etcd member 3) is cut off from the others
// for a while. C must answer SERVFAIL while cut off (not accept what it
// cannot commit); A and B go on; after healing the final value agrees
// everywhere and the whole history, checked by porcupine, is linearizable,
// so no acknowledged write was lost.
func partitionHistory(t *testing.T, c *etcdtest.Cluster, k tsig.Key, reps []*replica) {
	const name = "reg.alice.btmm.example."
	start := time.Now()
	var mu sync.Mutex
	var history []porcupine.Operation
	var partitionedAt, healedAt time.Time
	type cop struct {
		call, ret time.Time
		out       regOut
	}
	var cops []cop
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for ci, r := range reps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			last := ""
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				v := fmt.Sprintf("fd00::%x:%x", ci+1, i+1)
				in := regIn{op: "put", new: v}
				if i%2 == 1 && last != "" {
					in = regIn{op: "cas", old: last, new: v}
				}
				call := time.Now()
				rc, err := setAAAA(c, k, r.addr, name, in.old, in.new)
				ret := time.Now()
				out := regOut{}
				switch {
				case err != nil || rc == dns.RcodeServerFailure:
					out.unknown = true
				case rc == dns.RcodeSuccess:
					out.ok = true
					last = v
				case rc == dns.RcodeNXRrset && in.op == "cas":
				default:
					t.Errorf("client %d: %s", ci, dns.RcodeToString[rc])
					return
				}
				op := porcupine.Operation{ClientId: ci, Input: in, Call: call.Sub(start).Nanoseconds(),
					Output: out, Return: ret.Sub(start).Nanoseconds()}
				if out.unknown {
					op.Return = 1 << 62 // may take effect any time later
				}
				if ci == 2 && os.Getenv("BTMM_DEBUG_PARTITION") != "" {
					t.Logf("C: %s at +%v took %v: rc %d err %v", in.op, call.Sub(start), ret.Sub(call), rc, err)
				}
				mu.Lock()
				history = append(history, op)
				if ci == 2 {
					cops = append(cops, cop{call, ret, out})
				}
				mu.Unlock()
				if out.unknown {
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	}
	time.Sleep(2 * time.Second)
	c.Partition(3)
	mu.Lock()
	partitionedAt = time.Now()
	mu.Unlock()
	time.Sleep(14 * time.Second)
	mu.Lock()
	healedAt = time.Now()
	mu.Unlock()
	c.Heal(3)
	time.Sleep(4 * time.Second)
	close(stop)
	wg.Wait()
	// C's updates sent and answered while it was cut off: none
	// acknowledged (its etcd member cannot commit without the others),
	// some SERVFAIL (request_timeout is 5s, the cut 14s). A prerequisite
	// C cannot confirm against etcd is a SERVFAIL too, not NXRRSET.
	var cAcksInPartition, cFailsInPartition int
	for _, o := range cops {
		if o.call.Before(partitionedAt) || !o.call.Before(healedAt) {
			continue
		}
		if o.out.ok && o.ret.Before(healedAt) {
			cAcksInPartition++
		}
		if o.out.unknown && o.ret.Before(healedAt) {
			cFailsInPartition++
		}
	}
	if cAcksInPartition != 0 || cFailsInPartition == 0 {
		t.Fatalf("replica C while cut off: %d updates acknowledged, %d failed (want 0 and some)", cAcksInPartition, cFailsInPartition)
	}
	// The final value, once every replica agrees.
	var final string
	deadline := time.Now().Add(20 * time.Second)
	for {
		var vals []string
		for _, r := range reps {
			m := new(dns.Msg)
			m.SetQuestion(name, dns.TypeAAAA)
			resp, err := hubExchange(c, m, r.addr, &k) // private records: signed

			v := fmt.Sprintf("?%v", err)
			if err == nil && len(resp.Answer) == 1 {
				v = resp.Answer[0].(*dns.AAAA).AAAA.String()
			} else if err == nil {
				v = fmt.Sprintf("?%s/%d", dns.RcodeToString[resp.Rcode], len(resp.Answer))
			}
			vals = append(vals, v)
		}
		if !strings.HasPrefix(vals[0], "?") && vals[0] == vals[1] && vals[1] == vals[2] {
			final = vals[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas disagree after healing: %v", vals)
		}
		time.Sleep(200 * time.Millisecond)
	}
	now := time.Since(start).Nanoseconds()
	history = append(history, porcupine.Operation{ClientId: 3, Input: regIn{op: "read"}, Call: now,
		Output: regOut{value: final}, Return: now + 1})
	acked := 0
	for _, op := range history {
		if op.Output.(regOut).ok {
			acked++
		}
	}
	res, info := porcupine.CheckOperationsVerbose(registerModel, history, time.Minute)
	if res != porcupine.Ok {
		f := filepath.Join(t.TempDir(), "history.html")
		porcupine.VisualizePath(registerModel, info, f)
		t.Fatalf("history of %d operations (%d acknowledged) is %s (visualization: %s)", len(history), acked, res, f)
	}
	t.Logf("%d operations, %d acknowledged, %d SERVFAIL at the cut-off replica; linearizable", len(history), acked, cFailsInPartition)
}
