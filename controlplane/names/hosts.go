package names

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
)

// The managed block's markers. One block per btmmd instance (named by its
// own FQDN), so several agents on one machine (tests, namespaces) never
// fight over it; everything outside the block is kept byte for byte.
func markers(self string) (begin, end string) {
	return "# BEGIN btmm " + self + " (managed by btmmd, removed when it stops)", "# END btmm " + self
}

// RenderHosts returns old with self's block replaced by hosts (each as
// "ULA fqdn label"), or removed when hosts is empty.
func RenderHosts(old []byte, self, domain string, hosts []Host) []byte {
	begin, end := markers(self)
	var out bytes.Buffer
	lines := strings.SplitAfter(string(old), "\n")
	in := false
	for _, l := range lines {
		t := strings.TrimRight(l, "\n")
		switch {
		case t == begin:
			in = true
		case in && t == end:
			in = false
		case !in:
			out.WriteString(l)
		}
	}
	if len(hosts) == 0 {
		return out.Bytes()
	}
	if out.Len() > 0 && !bytes.HasSuffix(out.Bytes(), []byte("\n")) {
		out.WriteByte('\n')
	}
	d := strings.TrimSuffix(domain, ".")
	fmt.Fprintln(&out, begin)
	for _, h := range hosts {
		fmt.Fprintf(&out, "%s\t%s.%s %s\n", h.ULA, h.Name, d, h.Name)
	}
	fmt.Fprintln(&out, end)
	return out.Bytes()
}

// WriteHosts rewrites path's block for self. The file is rewritten in place
// with one write (it may be a bind mount, and btmmd's unit can write only
// this file under /etc); its mode and owner stay. An exclusive flock
// serializes btmmd instances on one machine (each has its own block).
func WriteHosts(path, self, domain string, hosts []Host) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("hosts file: %w", err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("hosts file %s: lock: %w", path, err)
	}
	old, err := io.ReadAll(f)
	if err != nil {
		return fmt.Errorf("hosts file %s: %w", path, err)
	}
	next := RenderHosts(old, self, domain, hosts)
	if bytes.Equal(old, next) {
		return nil
	}
	if _, err := f.WriteAt(next, 0); err != nil {
		return fmt.Errorf("hosts file %s: %w", path, err)
	}
	if err := f.Truncate(int64(len(next))); err != nil {
		return fmt.Errorf("hosts file %s: %w", path, err)
	}
	return nil
}
