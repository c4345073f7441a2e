package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const sample = `tier: host
machine: 2 CPUs (AMD EPYC), 24 GiB, Linux 6.18
command: go test -bench X ./a/
date: 2026-12-02
load: 1.0 2.0 3.0
cpu: AMD EPYC
what: a vs b
BenchmarkX-2	1
BenchmarkX/a	1	10 Mbit/s
BenchmarkX/b	1	5 Mbit/s	0.5 ratio-to-a
BenchmarkX/a	1	30 Mbit/s
BenchmarkX/b	1	6 Mbit/s	0.2 ratio-to-a
BenchmarkX/a	1	20 Mbit/s
BenchmarkX/b	1	7 Mbit/s	0.35 ratio-to-a
ok  	pkg	1s
command: go test -bench Y ./b/
date: 2026-12-01
machine: 4 CPUs (other), 8 GiB, Linux 6.1
load: 1.0 2.0 3.0
BenchmarkY-2	1	4 p99-ms	0 ns/op
failed: go test -bench Z ./c/
`

func TestReport(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "host.txt")
	doc := filepath.Join(dir, "benchmarks.md")
	os.WriteFile(in, []byte(sample), 0o644)
	os.WriteFile(doc, []byte("# Benchmarks\n\nprose\n\n"+beginMark+"\n| stale row |\n"+endMark+"\n\nmore prose\n"), 0o644)
	if err := run(doc, []string{in, filepath.Join(dir, "vm.txt")}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(doc)
	s := string(got)
	for _, want := range []string{
		"# Benchmarks\n\nprose\n\n" + beginMark,
		"### host tier\n\nMachine: 2 CPUs (AMD EPYC), 24 GiB, Linux 6.18.",
		"#### X\n\na vs b.\n\n`go test -bench X ./a/` (2026-12-02, load average 1.0 2.0 3.0)\n",
		"| a | 20 Mbit/s (10–30) | 3 |",
		"| b | 6 Mbit/s (5–7); 0.35 ratio-to-a (0.2–0.5) | 3 |",
		"#### Y\n\n`go test -bench Y ./b/` (2026-12-01, load average 1.0 2.0 3.0; machine 4 CPUs (other), 8 GiB, Linux 6.1)",
		"| Y | 4 p99-ms | 1 |",
		"**Failed in this run, nothing measured:** `go test -bench Z ./c/`",
		endMark + "\n\nmore prose\n",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("missing %q in:\n%s", want, s)
		}
	}
	if strings.Contains(s, "stale row") || strings.Contains(s, "BenchmarkX-2") {
		t.Errorf("stale row or metric-less line kept:\n%s", s)
	}
	if err := run(filepath.Join(dir, "none.md"), []string{in}); err == nil {
		t.Error("missing document accepted")
	}
}
