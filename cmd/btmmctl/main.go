// Command btmmctl: see the usage text below (`btmmctl --help`).
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/btmm/btmm/cmd/internal/cli"
)

const synopsis = `btmmctl: inspect a running btmmd.

Usage: btmmctl [flags] <command>`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlagSet("btmmctl", synopsis)
	if done, code := fs.Parse(args, stdout, stderr); done {
		return code
	}
	fmt.Fprintln(stderr, "btmmctl: not implemented yet in this build")
	return 1
}
