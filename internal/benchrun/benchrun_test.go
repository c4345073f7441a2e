package benchrun

import (
	"bytes"
	"flag"
	"strings"
	"testing"
)

func TestAlternate(t *testing.T) {
	var buf bytes.Buffer
	Out = &buf
	defer func() { Out = nil }()
	t.Setenv("BTMM_BENCH_ROUNDS", "2") // below the minimum: 5 rounds
	setBenchtime(t, "1x")
	var order []string
	round := 0
	testing.Benchmark(func(b *testing.B) {
		mk := func(name string, v float64) Case {
			return Case{Name: name, Run: func(testing.TB) []Metric {
				order = append(order, name)
				round++
				return []Metric{{v, "Mbit/s"}, {float64(round), "n"}}
			}}
		}
		Alternate(b, "a  test\ncomparison", "base", mk("base", 200), mk("fast", 100))
	})
	if got := strings.Join(order, " "); got != "base fast fast base base fast fast base base fast" {
		t.Fatalf("order %q: want 5 rounds, the order rotated each round", got)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 11 || lines[0] != "what: a test comparison" {
		t.Fatalf("output:\n%s", buf.String())
	}
	// Lines of one round, in case order; the ratio is within the round.
	if !strings.HasSuffix(lines[1], "/base\t1\t200 Mbit/s\t1 n") || !strings.HasSuffix(lines[2], "/fast\t1\t100 Mbit/s\t2 n\t0.5 ratio-to-base") {
		t.Fatalf("round 1 lines:\n%s\n%s", lines[1], lines[2])
	}
}

// setBenchtime sets -test.benchtime for testing.Benchmark in this test.
func setBenchtime(t *testing.T, v string) {
	f := flag.Lookup("test.benchtime")
	old := f.Value.String()
	if err := f.Value.Set(v); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Value.Set(old) })
}

// A benchmark run without -benchtime 1x fails instead of looping over
// rounds it would not report.
func TestAlternateWantsOneIteration(t *testing.T) {
	Out = new(bytes.Buffer)
	defer func() { Out = nil }()
	setBenchtime(t, "3x")
	runs := 0
	r := testing.Benchmark(func(b *testing.B) {
		Alternate(b, "", "", Case{Name: "a", Run: func(testing.TB) []Metric { runs++; return []Metric{{1, "x"}} }})
	})
	if runs != 5 || r.N != 0 {
		// run1 (b.N = 1) measured 5 rounds; the b.N = 3 call failed
		// before any round, and a failed benchmark has no result (N 0).
		t.Fatalf("%d rounds, result N %d: want 5 rounds from the b.N = 1 call only, then a failure", runs, r.N)
	}
}

// A case's own Baseline takes its ratio to that case (pairs).
func TestAlternatePairs(t *testing.T) {
	var buf bytes.Buffer
	Out = &buf
	defer func() { Out = nil }()
	setBenchtime(t, "1x")
	testing.Benchmark(func(b *testing.B) {
		c := func(name, base string, v float64) Case {
			return Case{Name: name, Baseline: base, Run: func(testing.TB) []Metric { return []Metric{{v, "ms"}} }}
		}
		Alternate(b, "", "", c("a-idle", "", 2), c("a-busy", "a-idle", 4), c("b-idle", "", 1), c("b-busy", "b-idle", 3))
	})
	for _, want := range []string{"/a-busy\t1\t4 ms\t2 ratio-to-a-idle\n", "/b-busy\t1\t3 ms\t3 ratio-to-b-idle\n", "/a-idle\t1\t2 ms\n"} {
		if strings.Count(buf.String(), want) != 5 {
			t.Errorf("want 5 lines ending %q in:\n%s", want, buf.String())
		}
	}
}

func TestStats(t *testing.T) {
	for _, tc := range []struct {
		v           []float64
		med, lo, hi float64
	}{
		{[]float64{3, 1, 2}, 2, 1, 3},
		{[]float64{4, 1, 3, 2}, 2.5, 1, 4},
		{[]float64{7}, 7, 7, 7},
	} {
		med, lo, hi := Stats(tc.v)
		if med != tc.med || lo != tc.lo || hi != tc.hi {
			t.Errorf("Stats(%v) = %v %v %v", tc.v, med, lo, hi)
		}
	}
	if s := Summary([][]Metric{{{1, "ms"}}, {{3, "ms"}}, {{2, "ms"}}}); s != "ms 2 (1–3)" {
		t.Errorf("Summary: %q", s)
	}
}
