// Command btmm-dnsd: see the usage text below (`btmm-dnsd --help`).
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/btmm/btmm/cmd/internal/cli"
)

const synopsis = `btmm-dnsd: the btmm rendezvous DNS server (RFC 2136 updates with TSIG,
update leases, Long-Lived Queries, DNS over TLS).

Usage: btmm-dnsd [flags]`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmm-dnsd", synopsis)
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	fmt.Fprintln(stderr, "btmm-dnsd: not implemented yet in this build")
	return 1
}
