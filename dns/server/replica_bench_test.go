package server_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/llq"
	"github.com/btmm/btmm/dns/store"
	"github.com/btmm/btmm/dns/store/etcdstore"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/internal/etcdtest"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
	"google.golang.org/grpc"
)

// BenchmarkStores compares, in one run on one machine, the real daemons:
// btmm-dnsd on its embedded store, three btmm-dnsd replicas on a
// three-member etcd cluster (each replica and member in its own site
// namespace) and BIND 9 named. Clients run in the hub namespace.
//
//   - signed updates/s: 4 workers, one user each (hmac-sha256), each update
//     adding one AAAA; the replicas' workers spread over the three replicas.
//     Each worker waits for its answer, so this is 4 / the latency of one
//     update; "updates16" runs 16 workers (16 users) to show how far each
//     system goes with more clients at once;
//   - LLQ push latency: an LLQ held at one server (replica C for etcd), an
//     update sent to another (replica A), time from sending the update to
//     the event's arrival; p50 and p99 over 40 pushes (named has no LLQ).
//
// Rounds (BTMM_BENCH_ROUNDS, default 5) alternate the systems, rotating
// their order. Each round prints benchstat-compatible lines
// (BenchmarkStores/<metric>/<system> 1 <value> <unit>); the final metrics
// are the medians. Reported, never asserted. Run with -benchtime 1x.
func BenchmarkStores(b *testing.B) {
	testenv.RequireBinary(b, "named", "bind9")
	bin := buildDaemon(b)
	c := etcdtest.Start(b, 3)
	var keys []tsig.Key
	for i := range 16 {
		u := []string{"alice", "bob", "carol", "dave"}[i%4]
		if i >= 4 {
			u = fmt.Sprintf("user%d", i)
		}
		k, err := tsig.NewKey(u+".btmm.example.", "")
		if err != nil {
			b.Fatal(err)
		}
		keys = append(keys, k)
	}
	ca := newTestCA(b)
	reps := startServers(b, c, bin, keys, ca, "etcd", "53", "853")
	emb := startServers(b, c, bin, keys, ca, "embedded", "5353", "8853")[0]
	named := startNamedIn(b, c, keys)

	type system struct {
		name    string
		updates []string // addresses the workers use, round robin
		llqAt   string   // where the LLQ lives ("" no LLQ)
	}
	systems := []system{
		{"embedded", []string{emb.addr}, emb.addr},
		{"etcd3", []string{reps[0].addr, reps[1].addr, reps[2].addr}, reps[2].addr},
		{"named", []string{named}, ""},
	}
	rounds := 5
	if v := os.Getenv("BTMM_BENCH_ROUNDS"); v != "" {
		fmt.Sscan(v, &rounds)
	}
	results := map[string][]float64{}
	report := func(metric, sys string, v float64, unit string) {
		fmt.Printf("BenchmarkStores/%s/%s \t       1\t%12.2f %s\n", metric, sys, v, unit)
		results[metric+"/"+sys+" "+unit] = append(results[metric+"/"+sys+" "+unit], v)
	}
	b.ResetTimer()
	for round := range rounds {
		for i := range systems {
			s := systems[(i+round)%len(systems)]
			tag := fmt.Sprintf("%s-r%d", s.name, round)
			report("updates", s.name, hubUpdates(b, c, s.updates, keys[:4], 400, tag), "updates/s")
			report("updates16", s.name, hubUpdates(b, c, s.updates, keys, 800, tag+"x16"), "updates/s")
			if s.llqAt != "" {
				lat := pushLatency(b, c, keys[0], s.llqAt, s.updates[0], 40, tag)
				report("push-p50", s.name, float64(lat[len(lat)/2].Microseconds())/1000, "ms")
				report("push-p99", s.name, float64(lat[len(lat)*99/100].Microseconds())/1000, "ms")
			}
		}
	}
	b.StopTimer()
	names := make([]string, 0, len(results))
	for k := range results {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		v := slices.Clone(results[k])
		slices.Sort(v)
		metric, unit, _ := strings.Cut(k, " ")
		b.Logf("%-24s median %10.2f %s (min %.2f, max %.2f, n=%d)", metric, v[len(v)/2], unit, v[0], v[len(v)-1], len(v))
		b.ReportMetric(v[len(v)/2], strings.ReplaceAll(metric, "/", "-")+"-"+unit)
	}
}

// startNamedIn runs BIND 9 named in site 2's namespace (port 5300) as the
// primary of btmm.example., accepting updates signed with any of keys.
func startNamedIn(b *testing.B, c *etcdtest.Cluster, keys []tsig.Key) string {
	named := testenv.RequireBinary(b, "named", "bind9")
	s := c.Sites[1]
	dir := b.TempDir()
	os.WriteFile(filepath.Join(dir, "btmm.example.db"), []byte(`$TTL 300
@ IN SOA ns.btmm.example. hostmaster.btmm.example. 1 3600 600 86400 60
@ IN NS ns.btmm.example.
ns IN A 127.0.0.1
`), 0o644)
	var clauses, grants strings.Builder
	for _, k := range keys {
		clauses.WriteString(k.BINDClause())
		fmt.Fprintf(&grants, "grant %s zonesub ANY; ", strings.TrimSuffix(k.Name, "."))
	}
	conf := fmt.Sprintf(`%s
options {
	directory %q;
	listen-on port 5300 { %s; };
	listen-on-v6 { none; };
	pid-file none;
	recursion no;
	dnssec-validation no;
	notify no;
};
controls { };
zone "btmm.example." {
	type primary;
	file "btmm.example.db";
	update-policy { %s};
};
`, clauses.String(), dir, s.Addr, grants.String())
	cf := filepath.Join(dir, "named.conf")
	os.WriteFile(cf, []byte(conf), 0o600)
	var cmd *exec.Cmd = s.NS.Command(b.Context(), named, "-g", "-c", cf)
	if err := s.NS.StartCmd(cmd); err != nil {
		b.Fatal(err)
	}
	addr := net.JoinHostPort(s.Addr, "5300")
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		m := new(dns.Msg)
		m.SetQuestion("btmm.example.", dns.TypeSOA)
		if r, err := hubExchange(c, m, addr, nil); err == nil && r.Rcode == 0 {
			return addr
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.Fatal("named did not start")
	return ""
}

// hubUpdates sends n signed updates from one worker per key (worker i
// signs with keys[i] and sends to addrs[i%len(addrs)]) and returns
// updates/s.
func hubUpdates(b *testing.B, c *etcdtest.Cluster, addrs []string, keys []tsig.Key, n int, tag string) float64 {
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range keys {
		k := keys[w]
		addr := addrs[w%len(addrs)]
		user := strings.TrimSuffix(k.Name, ".btmm.example.")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				m := new(dns.Msg)
				m.SetUpdate(zoneName)
				rr, _ := dns.NewRR(fmt.Sprintf("h%d-%s.%s.btmm.example. 60 IN AAAA fd00::%x", i, tag, user, i))
				m.Insert([]dns.RR{rr})
				r, err := hubExchange(c, m, addr, &k)
				if err != nil || r.Rcode != dns.RcodeSuccess {
					if failed.Add(1) == 1 {
						b.Logf("%s: first failure: %v %v", tag, err, r)
					}
				}
			}
		}()
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		b.Fatalf("%s: %d updates failed", tag, f)
	}
	return float64(n) / time.Since(start).Seconds()
}

// pushLatency holds one UDP LLQ at llqAt (a socket in the hub) and sends n
// updates of its name to updAt; it returns the sorted latencies from
// sending an update to receiving its event.
func pushLatency(b *testing.B, c *etcdtest.Cluster, k tsig.Key, llqAt, updAt string, n int, tag string) []time.Duration {
	return pushLatencyOn(b, c, k, llqAt, updAt, n, "push-"+tag+".alice.btmm.example.", tag)
}

func pushLatencyOn(b *testing.B, c *etcdtest.Cluster, k tsig.Key, llqAt, updAt string, n int, name, tag string) []time.Duration {
	var conn *net.UDPConn
	if err := c.Hub.Do(func() error {
		var err error
		conn, err = net.ListenUDP("udp", &net.UDPAddr{})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	srv, _ := net.ResolveUDPAddr("udp", llqAt)
	prov := k.Provider()
	send := func(m *dns.Msg) {
		m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
		d, _, err := dns.TsigGenerateWithProvider(m, prov, "", false)
		if err != nil {
			b.Fatal(err)
		}
		conn.WriteToUDP(d, srv)
	}
	recv := func(id uint16, event bool) *dns.Msg {
		buf := make([]byte, 65535)
		for {
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			nr, _, err := conn.ReadFromUDP(buf)
			if err != nil {
				b.Fatalf("%s: %v", tag, err)
			}
			m := new(dns.Msg)
			if m.Unpack(buf[:nr]) != nil {
				continue
			}
			o, ok := llq.Option(m)
			if event && ok && o.Opcode == llq.OpEvent {
				ack := new(dns.Msg)
				ack.SetReply(m)
				ack.Question = m.Question
				ack.Answer = nil
				llq.SetOption(ack, dns.EDNS0_LLQ{Version: llq.Version, Opcode: llq.OpEvent, Id: o.Id})
				send(ack)
				return m
			}
			if !event && m.Id == id {
				return m
			}
		}
	}
	q := llqQuery(name, dns.TypeAAAA, llq.OpSetup, 0, 3600)
	send(q)
	ch := recv(q.Id, false)
	o, ok := llq.Option(ch)
	if !ok || o.Id == 0 {
		b.Fatalf("%s: challenge %v", tag, ch)
	}
	q = llqQuery(name, dns.TypeAAAA, llq.OpSetup, o.Id, o.LeaseLife)
	send(q)
	recv(q.Id, false)
	var lat []time.Duration
	for i := range n {
		t0 := time.Now()
		if rc, err := setAAAA(c, k, updAt, name, "", fmt.Sprintf("fd00:ffff::%x", i+1)); err != nil || rc != dns.RcodeSuccess {
			b.Fatalf("%s: update: %s %v", tag, dns.RcodeToString[rc], err)
		}
		recv(0, true)
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	return lat
}

// manyHosts returns the records of host i (4 records, as btmmd registers:
// AAAA, SRV and TXT of _autotunnel._udp.<host>, the browse PTR), users of
// 10 hosts each (u<i/10>).
func manyHosts(i int, exp time.Time) []store.Record {
	user := fmt.Sprintf("u%d", i/10)
	host := fmt.Sprintf("h%d.%s.btmm.example.", i, user)
	svc := "_autotunnel._udp." + host
	texts := []string{
		fmt.Sprintf("%s 60 IN AAAA fd00:%x:%x::1", host, i>>16, i&0xffff),
		fmt.Sprintf("%s 60 IN SRV 0 0 4500 %s", svc, host),
		fmt.Sprintf(`%s 60 IN TXT "v=1" "ula=fd00:%x:%x::1"`, svc, i>>16, i&0xffff),
		fmt.Sprintf("_autotunnel._udp.%s.btmm.example. 60 IN PTR %s", user, svc),
	}
	out := make([]store.Record, len(texts))
	for j, t := range texts {
		rr, err := dns.NewRR(t)
		if err != nil {
			panic(err)
		}
		out[j] = store.Record{RR: rr, Expires: exp, Owner: "u0.btmm.example."}
	}
	return out
}

// fill writes hosts [0, n) into st, batch hosts per transaction.
func fill(b *testing.B, st store.Store, n, batch int) {
	exp := time.Now().Add(2 * time.Hour)
	for i := 0; i < n; i += batch {
		var ops []store.Op
		for h := i; h < min(i+batch, n); h++ {
			for _, r := range manyHosts(h, exp) {
				ops = append(ops, store.Op{Kind: store.Put, Record: r})
			}
		}
		if _, err := st.Update(b.Context(), func(store.View) ([]store.Op, error) { return ops, nil }); err != nil {
			b.Fatalf("fill at host %d: %v", i, err)
		}
	}
}

// daemonMemory returns the process's resident set (VmRSS) in bytes.
func daemonMemory(b *testing.B, pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			var kb float64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), &kb)
			return kb * 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// BenchmarkManyHosts: 100,000 registered hosts (BTMM_BENCH_HOSTS), 4
// records each, on the embedded store and on the etcd store (three
// replicas on a three-member cluster): the daemon's start-up time (kill -9,
// then exec to first answer, with the records loaded), its resident memory
// once up, and LLQ push latency p50/p99 (20 pushes; for etcd: update at
// replica A, LLQ at replica C). BTMM_BENCH_ROUNDS (default 5) rounds
// alternate the two, rotating their order; per-round lines are
// benchstat-compatible, the summary gives median, min and max. Reported,
// never asserted; run with -benchtime 1x.
func BenchmarkManyHosts(b *testing.B) {
	hosts := 100000
	if v := os.Getenv("BTMM_BENCH_HOSTS"); v != "" {
		fmt.Sscan(v, &hosts)
	}
	rounds := 5
	if v := os.Getenv("BTMM_BENCH_ROUNDS"); v != "" {
		fmt.Sscan(v, &rounds)
	}
	bin := buildDaemon(b)
	c := etcdtest.Start(b, 3)
	replicaStartTimeout = 10 * time.Minute
	defer func() { replicaStartTimeout = 30 * time.Second }()
	k, err := tsig.NewKey("u0.btmm.example.", "")
	if err != nil {
		b.Fatal(err)
	}
	ca := newTestCA(b)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	results := map[string][]float64{}
	report := func(metric, sys string, v float64, unit string) {
		fmt.Printf("BenchmarkManyHosts/%s/%s \t1\t%12.2f %s\n", metric, sys, v, unit)
		results[metric+"/"+sys+" "+unit] = append(results[metric+"/"+sys+" "+unit], v)
	}
	measure := func(sys string, r *replica, llqAt, updAt string) {
		r.kill9() // restart with the records in place, timed
		t0 := time.Now()
		r.start()
		startup := time.Since(t0)
		rss := daemonMemory(b, r.cmd.Process.Pid)
		// The server refuses messages signed before it started (a replay
		// guard with one-second resolution).
		time.Sleep(1100 * time.Millisecond)
		lat := pushLatencyName(b, c, k, llqAt, updAt, 20, "h0.u0.btmm.example.")
		report("startup", sys, ms(startup), "ms")
		report("rss", sys, rss/float64(hosts), "B/host")
		report("push-p50", sys, ms(lat[len(lat)/2]), "ms")
		report("push-p99", sys, ms(lat[len(lat)*99/100]), "ms")
	}

	// Embedded: the records written straight into the data directory.
	emb := startServers(b, c, bin, []tsig.Key{k}, ca, "embedded", "5353", "8853")[0]
	emb.kill9()
	st, err := store.Open(filepath.Join(filepath.Dir(emb.conf), "data", "store"))
	if err != nil {
		b.Fatal(err)
	}
	fill(b, st, hosts, 500)
	st.Close()
	emb.start()

	// etcd: the records written through the etcd store, then the replicas.
	local, _ := store.Open(b.TempDir())
	dial := grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return c.DialHub("tcp", addr) })
	es, err := etcdstore.Open(b.Context(), etcdstore.Config{Endpoints: c.Endpoints(), Local: local, RequestTimeout: time.Minute,
		DialOptions: []grpc.DialOption{dial}, Guard: func(string) string { return "fill" }})
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	fill(b, es, hosts, 25) // 25 hosts: 76 keys + a guard, under etcd's 128 operations per transaction
	b.Logf("etcd: %d hosts written in %v", hosts, time.Since(t0))
	es.Close()
	reps := startReplicas(b, c, bin, k, ca)

	systems := []func(){
		func() { measure("embedded", emb, emb.addr, emb.addr) },
		func() { measure("etcd", reps[2], reps[2].addr, reps[0].addr) },
	}
	b.ResetTimer()
	for round := range rounds {
		for i := range systems {
			systems[(i+round)%len(systems)]()
		}
	}
	b.StopTimer()
	names := make([]string, 0, len(results))
	for k := range results {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		v := slices.Clone(results[k])
		slices.Sort(v)
		metric, unit, _ := strings.Cut(k, " ")
		b.Logf("%-24s median %10.2f %s (min %.2f, max %.2f, n=%d)", metric, v[len(v)/2], unit, v[0], v[len(v)-1], len(v))
		b.ReportMetric(v[len(v)/2], strings.ReplaceAll(metric, "/", "-")+"-"+unit)
	}
}

// pushLatencyName is pushLatency on a given name.
func pushLatencyName(b *testing.B, c *etcdtest.Cluster, k tsig.Key, llqAt, updAt string, n int, name string) []time.Duration {
	return pushLatencyOn(b, c, k, llqAt, updAt, n, name, name)
}
