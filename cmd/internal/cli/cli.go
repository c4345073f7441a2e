// Package cli holds what the three btmm commands share on their command line:
// the version string and the common handling of --help and --version.
package cli

import (
	"flag"
	"fmt"
	"io"
	"runtime/debug"
)

// Version is set at link time with -ldflags "-X github.com/btmm/btmm/cmd/internal/cli.Version=v1.2.3".
// When it is empty the module version or VCS revision from the build info is used.
var Version string

// VersionString returns the version a command reports for --version.
func VersionString() string {
	if Version != "" {
		return Version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "(devel)"
	}
	if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			return "(devel) " + s.Value
		}
	}
	return "(devel)"
}

// NewFlagSet returns a flag set for the named command whose usage text starts
// with synopsis, and which knows --version. Call Parse to use it.
func NewFlagSet(name, synopsis string) *FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	f := &FlagSet{FlagSet: fs, name: name}
	fs.BoolVar(&f.version, "version", false, "print the version and exit")
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, "%s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return f
}

// FlagSet is a flag.FlagSet that handles --help and --version itself.
type FlagSet struct {
	*flag.FlagSet
	name    string
	version bool
}

// Parse parses args. It returns done == true when the command should exit
// with code: after --help or --version (printed to stdout, code 0) or after a
// usage error (printed to stderr, code 2).
func (f *FlagSet) Parse(args []string, stdout, stderr io.Writer) (done bool, code int) {
	f.SetOutput(stderr)
	for _, a := range args {
		if a == "-h" || a == "-help" || a == "--help" {
			f.SetOutput(stdout)
			f.Usage()
			return true, 0
		}
		if a == "--" {
			break
		}
	}
	if err := f.FlagSet.Parse(args); err != nil {
		return true, 2
	}
	if f.version {
		fmt.Fprintf(stdout, "%s %s\n", f.name, VersionString())
		return true, 0
	}
	return false, 0
}
