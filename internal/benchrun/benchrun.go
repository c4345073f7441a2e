// Package benchrun runs btmm's benchmarks the way docs/benchmarks.md reports
// them: the cases of a comparison (the thing measured and its baseline) run
// alternated, round after round, in one run on one machine (A B C A B C ...,
// the order rotated each round), and every case's figures of every round are
// printed as a benchstat line:
//
//	BenchmarkVMThroughput/esp-in-udp 1 14.2 Mbit/s 0.013 ratio-to-veth
//
// so `benchstat` can compare two commits, and hack/bench/report turns the
// lines into docs/benchmarks.md rows (median and min–max over the rounds).
// A "what:" line before them (benchfmt configuration) describes the
// comparison for the report. Ratios are taken within a round, against the
// baseline case of the same round.
package benchrun

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// MinRounds is the least number of rounds a reported comparison runs.
const MinRounds = 5

// Rounds is the number of rounds: BTMM_BENCH_ROUNDS, at least MinRounds.
func Rounds() int {
	n, err := strconv.Atoi(os.Getenv("BTMM_BENCH_ROUNDS"))
	if err != nil || n < MinRounds {
		return MinRounds
	}
	return n
}

// Metric is one figure of one round.
type Metric struct {
	Value float64
	Unit  string // benchstat unit, e.g. "Mbit/s", "ms", "s"; no spaces
}

// Case is one side of a comparison. Run measures one round and returns its
// metrics; the first is the one ratios are taken of.
type Case struct {
	Name string
	Run  func(tb testing.TB) []Metric
	// NoRatio leaves the ratio to the baseline off this case's lines (a
	// case that is not comparable to it, only measured alongside).
	NoRatio bool
	// Baseline, when set, names the case this one's ratio is taken to
	// instead of Alternate's baseline (a comparison of pairs).
	Baseline string
}

// Out is where the lines go (the test binary's standard output, which
// go test and hack/vmexec pass through unchanged).
var Out io.Writer = os.Stdout

// Alternate runs the cases for Rounds() rounds, rotating their order each
// round, and prints one line per case per round. baseline names the case
// the others' first metric is divided by ("" for none): each other case's
// line then also carries "ratio-to-<baseline>". It returns the metrics by
// case, round by round, for the caller's own checks and logs.
//
// tb is a benchmark run with -benchtime 1x (the rounds are the
// repetitions: a benchmark called again with a larger b.N fails rather
// than loop over rounds it does not report), or a test (an opt-in one of
// the VM tier): its lines are named Benchmark<name without "Test">.
func Alternate(tb testing.TB, what, baseline string, cases ...Case) map[string][][]Metric {
	tb.Helper()
	b, _ := tb.(*testing.B)
	if b != nil && b.N != 1 {
		tb.Fatalf("benchrun: %s runs with -benchtime 1x (b.N = %d): its repetitions are BTMM_BENCH_ROUNDS rounds", tb.Name(), b.N)
	}
	has := func(name string) bool { return slices.ContainsFunc(cases, func(c Case) bool { return c.Name == name }) }
	if baseline != "" && !has(baseline) {
		tb.Fatalf("benchrun: baseline %q is not a case", baseline)
	}
	for _, c := range cases {
		if c.Baseline != "" && !has(c.Baseline) {
			tb.Fatalf("benchrun: baseline %q of %s is not a case", c.Baseline, c.Name)
		}
	}
	Describe(tb, what)
	n := Rounds()
	out := map[string][][]Metric{}
	for r := range n {
		got := map[string][]Metric{}
		for i := range cases {
			c := cases[(i+r)%len(cases)]
			m := c.Run(tb)
			if len(m) == 0 {
				tb.Fatalf("benchrun: case %s returned no metrics", c.Name)
			}
			got[c.Name] = m
		}
		for _, c := range cases {
			m := got[c.Name]
			base := baseline
			if c.Baseline != "" {
				base = c.Baseline
			}
			if base != "" && c.Name != base && !c.NoRatio {
				if v := got[base][0].Value; v != 0 {
					m = append(slices.Clip(m), Metric{m[0].Value / v, "ratio-to-" + base})
				}
			}
			Print(tb, c.Name, m...)
			out[c.Name] = append(out[c.Name], m)
		}
	}
	for _, c := range cases {
		tb.Logf("%s: %s over %d rounds", c.Name, Summary(out[c.Name]), n)
	}
	if b != nil {
		b.ReportMetric(0, "ns/op") // the run's wall time is not a figure
	}
	return out
}

// Describe prints the "what:" configuration line for the lines that follow.
func Describe(tb testing.TB, what string) {
	if what != "" {
		fmt.Fprintf(Out, "what: %s\n", strings.Join(strings.Fields(what), " "))
	}
}

// Print prints one benchstat line for sub-benchmark name of tb.
func Print(tb testing.TB, name string, ms ...Metric) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s/%s\t1", benchName(tb), name)
	for _, m := range ms {
		fmt.Fprintf(&sb, "\t%s %s", strconv.FormatFloat(m.Value, 'g', 6, 64), m.Unit)
	}
	fmt.Fprintln(Out, sb.String())
}

// benchName is tb's name without the -GOMAXPROCS suffix, a test's with
// Benchmark for Test (benchstat reads only Benchmark lines).
func benchName(tb testing.TB) string {
	n := tb.Name()
	if _, ok := tb.(*testing.B); !ok {
		n = "Benchmark" + strings.TrimPrefix(n, "Test")
	}
	if i := strings.LastIndexByte(n, '-'); i > 0 {
		if _, err := strconv.Atoi(n[i+1:]); err == nil {
			return n[:i]
		}
	}
	return n
}

// Summary renders median (min–max) of each metric over the rounds.
func Summary(rounds [][]Metric) string {
	if len(rounds) == 0 {
		return "no rounds"
	}
	var parts []string
	for i, m := range rounds[0] {
		var v []float64
		for _, r := range rounds {
			if i < len(r) {
				v = append(v, r[i].Value)
			}
		}
		med, lo, hi := Stats(v)
		parts = append(parts, fmt.Sprintf("%s %.4g (%.4g–%.4g)", m.Unit, med, lo, hi))
	}
	return strings.Join(parts, ", ")
}

// Stats returns the median, min and max of v (the median of an even
// number of values is the mean of the middle two).
func Stats(v []float64) (median, lo, hi float64) {
	if len(v) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	median = s[len(s)/2]
	if len(s)%2 == 0 {
		median = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return median, s[0], s[len(s)-1]
}
