// Command lab brings btmm's canonical network lab (internal/lab, docs/lab.md)
// up or down from the shell, for the demo and for poking around by hand:
//
//	go run ./hack/lab up      # namespaces btmm-inet, btmm-gw1, ... btmm-pub
//	ip netns exec btmm-host1 ping 11.3.0.2
//	go run ./hack/lab down
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/btmm/btmm/internal/lab"
)

func main() {
	prefix := flag.String("prefix", "btmm", "namespace name prefix")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: lab [-prefix P] up|down|status\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	switch flag.Arg(0) {
	case "up":
		l, err := lab.Up(*prefix)
		if err != nil {
			fmt.Fprintln(os.Stderr, "lab up:", err)
			os.Exit(1)
		}
		for _, n := range l.All() {
			fmt.Println(n.Name)
		}
	case "down":
		l, err := lab.Attach(*prefix)
		if err != nil {
			fmt.Fprintln(os.Stderr, "lab down:", err)
			os.Exit(1)
		}
		if err := l.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "lab down:", err)
			os.Exit(1)
		}
	case "status":
		for _, r := range lab.Roles {
			name := *prefix + "-" + r
			if _, err := os.Stat("/run/netns/" + name); err == nil {
				fmt.Println(name, "up")
			} else {
				fmt.Println(name, "absent")
			}
		}
	default:
		flag.Usage()
		os.Exit(2)
	}
}
