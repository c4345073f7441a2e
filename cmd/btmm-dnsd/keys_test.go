package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

func registerHost(t *testing.T, addr string, k tsig.Key, host, n string) {
	t.Helper()
	d := ".alice.btmm.example."
	m := new(dns.Msg)
	m.SetUpdate("alice.btmm.example.")
	for _, s := range []string{host + d + " 60 IN AAAA fd00::" + n, "_autotunnel._udp." + host + d + " 60 IN SRV 0 0 1 AutoTunnel-" + n + d,
		"AutoTunnel-" + n + d + " 60 IN A 192.0.2.1", "_autotunnel._udp" + d + " 60 IN PTR _autotunnel._udp." + host + d} {
		rr, _ := dns.NewRR(s)
		m.Insert([]dns.RR{rr})
	}
	m.SetTsig(k.Name, k.Algorithm, 300, time.Now().Unix())
	c := &dns.Client{TsigProvider: k.Provider(), Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil || r.Rcode != dns.RcodeSuccess {
		t.Fatalf("register %s: %v %v", host, r, err)
	}
}

func TestAddhostDelhost(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "c.toml")
	os.WriteFile(conf, []byte("zone = \"btmm.example.\"\ndata_dir = \""+dir+"\"\nlisten = \"127.0.0.1:0\"\n"), 0o644)
	cfg, err := server.LoadConfig(conf)
	if err != nil {
		t.Fatal(err)
	}
	cli := func(args ...string) (string, int) {
		var out, errb bytes.Buffer
		code := run(append([]string{"-config", conf}, args...), &out, &errb)
		return out.String() + errb.String(), code
	}
	if out, code := cli("addhost", "alice", "laptop"); code == 0 {
		t.Fatalf("host of a missing user: %s", out)
	}
	if out, code := cli("adduser", "ns"); code == 0 {
		t.Fatalf("user ns owns the server's name: %s", out)
	}
	if out, code := cli("adduser", "alice"); code != 0 {
		t.Fatal(out)
	}
	out, code := cli("addhost", "alice", "laptop", "hmac-md5")
	if code != 0 {
		t.Fatal(out)
	}
	keys, err := tsig.ParseBIND([]byte(out))
	if err != nil || keys[0].Name != "laptop.alice.btmm.example." || keys[0].Algorithm != tsig.HmacMD5 {
		t.Fatalf("addhost printed %q: %v", out, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "keys", "alice", "laptop.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	out, _ = cli("addhost", "alice", "desktop")
	desktop, _ := tsig.ParseBIND([]byte(out))

	start := func() (*server.Server, string) {
		srv, err := server.New(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		addrs, err := srv.Start(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return srv, addrs.DNS
	}
	count := func(srv *server.Server) int {
		recs, _ := srv.Store().All()
		return len(recs)
	}
	// With the server running, delhost goes through its control socket.
	srv, addr := start()
	registerHost(t, addr, keys[0], "laptop", "1")
	registerHost(t, addr, desktop[0], "desktop", "2")
	out, code = cli("delhost", "alice", "laptop")
	if code != 0 || !strings.Contains(out, "4 records") {
		t.Fatalf("delhost (running): %d %s", code, out)
	}
	if n := count(srv); n != 4 { // the desktop's
		recs, _ := srv.Store().All()
		t.Fatalf("after delhost: %d records: %v", n, recs)
	}
	srv.Close()
	// With no server, delhost removes the records from the store itself.
	out, code = cli("delhost", "alice", "desktop")
	if code != 0 || !strings.Contains(out, "no server running") {
		t.Fatalf("delhost (offline): %d %s", code, out)
	}
	srv, _ = start()
	defer srv.Close()
	if n := count(srv); n != 0 {
		recs, _ := srv.Store().All()
		t.Fatalf("after offline delhost: %v", recs)
	}
	if out, code := cli("delhost", "alice", "desktop"); code == 0 {
		t.Fatalf("deleting a missing host: %s", out)
	}
}
