// Command btmmd: see the usage text below (`btmmd --help`).
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/btmm/btmm/cmd/internal/cli"
)

const synopsis = `btmmd: the btmm host agent (RFC 6281 Back to My Mac for Linux).

Usage: btmmd [flags]

Registers this host's IPv6 ULA under the user's domain, maps the tunnel port on
the NAT gateway, tracks the user's other hosts and programs kernel tunnels to them.`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmmd", synopsis)
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	fmt.Fprintln(stderr, "btmmd: not implemented yet in this build")
	return 1
}
