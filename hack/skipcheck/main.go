// Command skipcheck reads the `go test -json` streams of `make test`'s tiers
// (gotestsum --jsonfile) and fails unless every skipped test is explained by
// a rule in hack/skips.allow. A skip the VM tier exists to prevent (a missing
// kernel feature, module or tool) is therefore a failure, and so is a test
// the netns tier defers to the VM that the VM run did not pass:
//
//	go run ./hack/skipcheck -netns netns.json            # one tier
//	go run ./hack/skipcheck -vm vm.json
//	go run ./hack/skipcheck -netns netns.json -vm vm.json  # both, cross-checked
//
// Rules (one a line, '#' starts a comment; the reason after the rule's '#' is
// required):
//
//	<tier> <category> <test regexp> <skip message regexp>  # reason
//
// tier is netns or vm (the run the skip happens in); the test regexp matches
// "import/path.TestName/subtest" in full; the message regexp matches the skip
// message (the last line the test logged before SKIP) in full. category:
//
//	vm      deferred to the VM tier: the test must pass in the VM run
//	netns   deferred to the host: the test must pass in the netns run
//	optin   runs only when asked (benchmarks behind BTMM_BENCH=1)
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

// result is what one test did in one run.
type result struct {
	action  string // pass, fail, skip
	message string // for skips: the last line logged before SKIP
}

// run is every test of one tier: "pkg.Test" -> result.
type run map[string]result

// logLine matches testing's log prefix: "    file_test.go:12: message".
var logLine = regexp.MustCompile(`^\s+[^\s:]+\.go:\d+: (.*)$`)

// parseRun reads a go test -json stream; lines that are not JSON (a
// truncated tail, build noise) are ignored.
func parseRun(r io.Reader) (run, error) {
	out := run{}
	last := map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) != nil || e.Test == "" {
			continue
		}
		key := e.Package + "." + e.Test
		switch e.Action {
		case "output":
			if m := logLine.FindStringSubmatch(strings.TrimRight(e.Output, "\n")); m != nil {
				last[key] = m[1]
			}
		case "pass", "fail", "skip":
			out[key] = result{action: e.Action, message: last[key]}
		}
	}
	return out, sc.Err()
}

// rule is one line of the allow-list.
type rule struct {
	line           int
	tier, category string
	test, message  *regexp.Regexp
	reason         string
}

func parseRules(r io.Reader) ([]rule, error) {
	var rules []rule
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndex(line, " # ")
		if i < 0 || strings.TrimSpace(line[i+3:]) == "" {
			return nil, fmt.Errorf("line %d: a rule needs a reason after ' # '", n)
		}
		reason := strings.TrimSpace(line[i+3:])
		f := strings.Fields(line[:i])
		if len(f) < 4 {
			return nil, fmt.Errorf("line %d: want <tier> <category> <test regexp> <message regexp> # reason", n)
		}
		ru := rule{line: n, tier: f[0], category: f[1], reason: reason}
		switch {
		case ru.tier != "netns" && ru.tier != "vm":
			return nil, fmt.Errorf("line %d: tier %q: want netns or vm", n, ru.tier)
		case ru.category != "vm" && ru.category != "netns" && ru.category != "optin":
			return nil, fmt.Errorf("line %d: category %q: want vm, netns or optin", n, ru.category)
		case ru.category == ru.tier:
			return nil, fmt.Errorf("line %d: a %s skip cannot be deferred to the %s tier itself", n, ru.tier, ru.category)
		}
		var err error
		if ru.test, err = regexp.Compile("^(?:" + f[2] + ")$"); err != nil {
			return nil, fmt.Errorf("line %d: test regexp: %w", n, err)
		}
		msg := strings.TrimSpace(cutFields(line[:i], 3))
		if ru.message, err = regexp.Compile("^(?:" + msg + ")$"); err != nil {
			return nil, fmt.Errorf("line %d: message regexp: %w", n, err)
		}
		rules = append(rules, ru)
	}
	return rules, sc.Err()
}

// cutFields returns s without its first n blank-separated fields.
func cutFields(s string, n int) string {
	s = strings.TrimLeft(s, " \t")
	for range n {
		i := strings.IndexAny(s, " \t")
		if i < 0 {
			return ""
		}
		s = strings.TrimLeft(s[i:], " \t")
	}
	return s
}

// check returns one line per problem in tier's run; other (may be nil) is
// the other tier's run, for the cross-checks.
func check(tier string, r, other run, rules []rule) (problems []string, counts map[string]int) {
	counts = map[string]int{}
	for _, key := range sortedKeys(r) {
		res := r[key]
		if res.action != "skip" {
			continue
		}
		var match *rule
		for i := range rules {
			ru := &rules[i]
			if ru.tier == tier && ru.test.MatchString(key) && ru.message.MatchString(res.message) {
				match = ru
				break
			}
		}
		if match == nil {
			problems = append(problems, fmt.Sprintf("%s tier: %s skipped without an allowed reason: %q", tier, key, res.message))
			continue
		}
		counts[match.category]++
		if match.category == "optin" || other == nil {
			continue
		}
		if o, ok := other[key]; !ok || o.action != "pass" {
			got := "did not run"
			if ok {
				got = o.action
			}
			problems = append(problems, fmt.Sprintf("%s tier: %s skipped as deferred to the %s tier (hack/skips.allow:%d), but there it %s",
				tier, key, match.category, match.line, got))
		}
	}
	return problems, counts
}

func sortedKeys(r run) []string {
	keys := make([]string, 0, len(r))
	for k := range r {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func readRun(path string) (run, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r, err := parseRun(f)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(r) == 0 {
		return nil, fmt.Errorf("%s: no test results (an empty run proves nothing)", path)
	}
	return r, nil
}

func main() {
	allow := flag.String("allow", "hack/skips.allow", "allow-list of skips")
	netnsFile := flag.String("netns", "", "go test -json output of the netns tier")
	vmFile := flag.String("vm", "", "go test -json output of the vm tier")
	flag.Parse()
	if err := run1(*allow, *netnsFile, *vmFile, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "skipcheck:", err)
		os.Exit(1)
	}
}

func run1(allow, netnsFile, vmFile string, w io.Writer) error {
	if netnsFile == "" && vmFile == "" {
		return errors.New("give -netns and/or -vm")
	}
	f, err := os.Open(allow)
	if err != nil {
		return err
	}
	rules, err := parseRules(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", allow, err)
	}
	runs := map[string]run{}
	for tier, path := range map[string]string{"netns": netnsFile, "vm": vmFile} {
		if path == "" {
			continue
		}
		if runs[tier], err = readRun(path); err != nil {
			return err
		}
	}
	var problems []string
	for _, tier := range []string{"netns", "vm"} {
		r, ok := runs[tier]
		if !ok {
			continue
		}
		other := runs[map[string]string{"netns": "vm", "vm": "netns"}[tier]]
		p, counts := check(tier, r, other, rules)
		problems = append(problems, p...)
		fmt.Fprintf(w, "skipcheck: %s tier: %d results; skips allowed: %d deferred to vm, %d deferred to netns, %d opt-in; disallowed: %d\n",
			tier, len(r), counts["vm"], counts["netns"], counts["optin"], len(p))
	}
	if len(problems) > 0 {
		return fmt.Errorf("%d problem(s):\n  %s", len(problems), strings.Join(problems, "\n  "))
	}
	return nil
}
