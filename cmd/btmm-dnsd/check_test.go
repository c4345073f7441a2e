package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/miekg/dns"
)

// A damaged store: the server refuses to start naming file and offset and
// changes nothing; check reports it (exit 1); repair salvages; check is
// then clean and the server would start.
func TestCheckRepairCommands(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "c.toml")
	os.WriteFile(conf, []byte("zone = \"btmm.example.\"\ndata_dir = \""+dir+"\"\nlisten = \"127.0.0.1:0\"\n"), 0o644)
	sdir := filepath.Join(dir, "store")
	s, err := store.Open(sdir)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		rr, _ := dns.NewRR(fmt.Sprintf("h%d.alice.btmm.example. 60 IN A 192.0.2.%d", i, i))
		r := store.Record{RR: rr, Expires: time.Now().Add(time.Hour)}
		if _, err := s.Update(context.Background(), func(store.View) ([]store.Op, error) {
			return []store.Op{{Kind: store.Put, Record: r}}, nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	logf := filepath.Join(sdir, "wal.log")
	data, _ := os.ReadFile(logf)
	data[30] ^= 1 // inside the first record
	os.WriteFile(logf, data, 0o600)

	var out, errb bytes.Buffer
	if code := run([]string{"-config", conf}, &out, &errb); code != 1 ||
		!strings.Contains(errb.String(), logf+" is damaged at offset 0") || !strings.Contains(errb.String(), "btmm-dnsd repair") {
		t.Fatalf("serve on a damaged store: %d %q", code, errb.String())
	}
	if got, _ := os.ReadFile(logf); !bytes.Equal(got, data) {
		t.Fatal("refused start changed the log")
	}
	out.Reset()
	errb.Reset()
	if code := run([]string{"-config", conf, "check"}, &out, &errb); code != 1 || !strings.Contains(out.String(), "DAMAGED") ||
		!strings.Contains(out.String(), "4 intact log records after the damage") {
		t.Fatalf("check: %d %q %q", code, out.String(), errb.String())
	}
	out.Reset()
	if code := run([]string{"-config", conf, "repair"}, &out, &errb); code != 0 ||
		!strings.Contains(out.String(), "salvaged 4 intact log records") || !strings.Contains(out.String(), "(1 transactions lost)") {
		t.Fatalf("repair: %d %q %q", code, out.String(), errb.String())
	}
	out.Reset()
	if code := run([]string{"-config", conf, "check"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "ok: 4 records") {
		t.Fatalf("check after repair: %d %q", code, out.String())
	}
}
