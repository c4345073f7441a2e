package server_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/store"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/btmm/btmm/internal/testenv"
	"github.com/miekg/dns"
)

// Benchmarks are reported, not asserted. Run them with hack/bench/dnsd/run.sh.

// startNamed runs BIND 9 named as a primary for btmm.example. accepting
// updates signed with k anywhere in the zone; it returns the address.
func startNamed(b *testing.B, k tsig.Key) string {
	named := testenv.RequireBinary(b, "named", "bind9")
	dir := b.TempDir()
	addr := freeDNSPortB(b)
	host, port, _ := net.SplitHostPort(addr)
	zone := `$TTL 300
@ IN SOA ns.btmm.example. hostmaster.btmm.example. 1 3600 600 86400 60
@ IN NS ns.btmm.example.
ns IN A 127.0.0.1
`
	os.WriteFile(filepath.Join(dir, "btmm.example.db"), []byte(zone), 0o644)
	conf := fmt.Sprintf(`%s
options {
	directory %q;
	listen-on port %s { %s; };
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
	update-policy { grant %s zonesub ANY; };
};
`, k.BINDClause(), dir, port, host, strings.TrimSuffix(k.Name, "."))
	cf := filepath.Join(dir, "named.conf")
	os.WriteFile(cf, []byte(conf), 0o600)
	cmd := exec.Command(named, "-g", "-c", cf)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		m := new(dns.Msg)
		m.SetQuestion("btmm.example.", dns.TypeSOA)
		if r, _, err := (&dns.Client{Timeout: 200 * time.Millisecond}).Exchange(m, addr); err == nil && r.Rcode == 0 {
			return addr
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.Fatal("named did not start")
	return ""
}

func freeDNSPortB(b *testing.B) string {
	for range 50 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		addr := pc.LocalAddr().String()
		ln, err := net.Listen("tcp", addr)
		pc.Close()
		if err == nil {
			ln.Close()
			return addr
		}
	}
	b.Fatal("no free port")
	return ""
}

func benchServer(b *testing.B, mod func(*server.Config)) (*server.Server, server.Addrs) {
	cfg := server.Config{Zone: zoneName, DataDir: b.TempDir(), Listen: "127.0.0.1:0"}
	cfg.Limits.UpdatesPerSecond = 1e9
	cfg.Limits.UpdateBurst = 1e9
	if mod != nil {
		mod(&cfg)
	}
	srv, err := server.New(cfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	addrs, err := srv.Start(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	return srv, addrs
}

// signedUpdates sends n signed updates (each adding one AAAA) from workers
// goroutines and returns updates per second.
func signedUpdates(b *testing.B, addr string, k tsig.Key, n, workers int, tag string) float64 {
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Int64
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A fresh socket per update: miekg's dns.Conn chains the
			// previous response MAC into the next request's TSIG.
			c := &dns.Client{TsigProvider: k.Provider(), Timeout: 5 * time.Second}
			for {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				m := new(dns.Msg)
				m.SetUpdate(zoneName)
				rr, _ := dns.NewRR(fmt.Sprintf("h%d-%s.alice.btmm.example. 60 IN AAAA fd00::%x", i, tag, i))
				m.Insert([]dns.RR{rr})
				m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
				r, _, err := c.Exchange(m, addr)
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

// BenchmarkUpdatesVsNamed: TSIG-signed (hmac-sha256) UPDATEs per second,
// btmm-dnsd (fsync before each answer) vs BIND 9 named on the same machine
// in the same run, 4 concurrent clients.
func BenchmarkUpdatesVsNamed(b *testing.B) {
	srv, addrs := benchServer(b, nil)
	k, err := srv.AddUser("alice", "hmac-sha256")
	if err != nil {
		b.Fatal(err)
	}
	namedAddr := startNamed(b, k)
	n := max(b.N, 200)
	b.ResetTimer()
	ours := signedUpdates(b, addrs.DNS, k, n, 4, "ours")
	theirs := signedUpdates(b, namedAddr, k, n, 4, "named")
	b.ReportMetric(ours, "btmm-updates/s")
	b.ReportMetric(theirs, "named-updates/s")
	b.ReportMetric(ours/theirs, "ratio")
}

// BenchmarkMemoryPerHost: heap per registered host (AAAA + SRV + TXT + PTR,
// as a btmmd registers) in the server's store, 10,000 hosts.
func BenchmarkMemoryPerHost(b *testing.B) {
	const hosts = 10000
	srv, _ := benchServer(b, nil)
	st := srv.Store()
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	exp := time.Now().Add(time.Hour)
	for batch := 0; batch < hosts; batch += 1000 {
		_, err := st.Update(context.Background(), func(store.View) ([]store.Op, error) {
			var ops []store.Op
			for i := batch; i < batch+1000; i++ {
				h := fmt.Sprintf("host%d.alice.btmm.example.", i)
				for _, s := range []string{
					h + " 60 IN AAAA fd00::1:" + fmt.Sprintf("%x", i),
					fmt.Sprintf("host%d._ssh._tcp.alice.btmm.example. 60 IN SRV 0 0 22 %s", i, h),
					fmt.Sprintf("host%d._ssh._tcp.alice.btmm.example. 60 IN TXT \"txtvers=1\"", i),
					fmt.Sprintf("_ssh._tcp.alice.btmm.example. 60 IN PTR host%d._ssh._tcp.alice.btmm.example.", i),
				} {
					rr, _ := dns.NewRR(s)
					ops = append(ops, store.Op{Kind: store.Put, Record: store.Record{RR: rr, Expires: exp, Owner: "alice.btmm.example."}})
				}
			}
			return ops, nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&ms1)
	b.ReportMetric(float64(ms1.HeapAlloc-ms0.HeapAlloc)/hosts, "heap-B/host")
	for range b.N {
	}
}
