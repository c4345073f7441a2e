package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/btmm/btmm/dns/tsig"
)

func TestHelpAndVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"--help"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "adduser") {
		t.Fatalf("--help: %d %q", code, out.String())
	}
	out.Reset()
	if code := run([]string{"--version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "btmm-dnsd ") {
		t.Fatalf("--version: %d %q", code, out.String())
	}
}

func TestAdduserDeluser(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "c.toml")
	os.WriteFile(conf, []byte("zone = \"btmm.example.\"\ndata_dir = \""+dir+"\"\n"), 0o644)
	var out, errb bytes.Buffer
	if code := run([]string{"-config", conf, "adduser", "bob", "hmac-md5"}, &out, &errb); code != 0 {
		t.Fatalf("adduser: %d %s", code, errb.String())
	}
	keys, err := tsig.ParseBIND(out.Bytes())
	if err != nil || len(keys) != 1 || keys[0].Name != "bob.btmm.example." || keys[0].Algorithm != tsig.HmacMD5 {
		t.Fatalf("adduser printed %q: %v", out.String(), err)
	}
	fi, err := os.Stat(filepath.Join(dir, "keys", "bob.key"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file %v %v", fi, err)
	}
	errb.Reset()
	if code := run([]string{"-config", conf, "adduser", "bob"}, &out, &errb); code == 0 {
		t.Fatal("duplicate user accepted")
	}
	if code := run([]string{"-config", conf, "adduser", "Bad_Name"}, &out, &errb); code == 0 {
		t.Fatal("bad user name accepted")
	}
	if code := run([]string{"-config", conf, "deluser", "bob"}, &out, &errb); code != 0 {
		t.Fatalf("deluser: %s", errb.String())
	}
	if code := run([]string{"-config", conf, "frob"}, &out, &errb); code == 0 {
		t.Fatal("unknown command accepted")
	}
}
