package tsig

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/scanner"

	"github.com/miekg/dns"
)

// BINDClause returns the key in BIND's `key` clause format, usable with
// `nsupdate -k FILE` and in named.conf. It contains the secret: write it
// only to a 0600 file or to the administrator's terminal.
func (k Key) BINDClause() string {
	return fmt.Sprintf("key \"%s\" {\n\talgorithm %s;\n\tsecret \"%s\";\n};\n",
		strings.TrimSuffix(k.Name, "."), ShortAlgorithm(k.Algorithm), k.Base64())
}

// ParseBIND parses one or more `key "name" { algorithm A; secret "S"; };`
// clauses (comments with #, // and /* */ allowed). It is strict: another
// statement, an unknown or repeated clause, a missing algorithm or secret, or
// no key at all is an error. Errors never quote a secret. Both btmm-dnsd and
// the agent (dns/register) read key files with it.
func ParseBIND(data []byte) ([]Key, error) {
	var s scanner.Scanner
	s.Init(bytes.NewReader(stripHashComments(data)))
	s.Mode = scanner.ScanIdents | scanner.ScanStrings | scanner.ScanComments | scanner.SkipComments
	s.IsIdentRune = func(ch rune, i int) bool {
		return ch == '-' || ch == '.' || ch == '_' ||
			(ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
	}
	var serr error
	s.Error = func(_ *scanner.Scanner, msg string) { serr = errors.New(msg) }
	s.Filename = "key"
	// Allow # comments by stripping them first (the scanner knows // and /* */).
	next := func() string {
		tok := s.Scan()
		if tok == scanner.EOF {
			return ""
		}
		return s.TokenText()
	}
	unq := func(t string) string { return strings.Trim(t, `"`) }
	var keys []Key
	for {
		t := next()
		if serr != nil {
			return nil, fmt.Errorf("tsig: parse key file: %w", serr)
		}
		if t == "" {
			break
		}
		if t != "key" {
			return nil, fmt.Errorf("tsig: parse key file: %s: expected \"key\", got %q", s.Position, t)
		}
		name := unq(next())
		if next() != "{" {
			return nil, fmt.Errorf("tsig: parse key file: %s: expected {", s.Position)
		}
		var alg, secret string
		seen := map[string]bool{}
		for {
			f := next()
			if f == "}" {
				break
			}
			if f == "" {
				return nil, fmt.Errorf("tsig: parse key file: unexpected end")
			}
			if f != "algorithm" && f != "secret" {
				return nil, fmt.Errorf("tsig: parse key file: %s: unknown clause %q in key %q", s.Position, f, name)
			}
			if seen[f] {
				return nil, fmt.Errorf("tsig: parse key file: %s: %s given twice in key %q", s.Position, f, name)
			}
			seen[f] = true
			v := unq(next())
			if next() != ";" {
				return nil, fmt.Errorf("tsig: parse key file: %s: expected ;", s.Position)
			}
			if f == "algorithm" {
				alg = v
			} else {
				secret = v
			}
		}
		if t := next(); t != ";" {
			return nil, fmt.Errorf("tsig: parse key file: %s: expected ; after }", s.Position)
		}
		a, err := ParseAlgorithm(alg)
		if err != nil {
			return nil, fmt.Errorf("tsig: parse key %q: %w", name, err)
		}
		raw, err := base64.StdEncoding.DecodeString(secret)
		if err != nil || len(raw) == 0 {
			return nil, fmt.Errorf("tsig: parse key %q: %w", name, ErrBadSecret)
		}
		if _, ok := dns.IsDomainName(name); !ok || name == "" {
			return nil, fmt.Errorf("tsig: parse key: %w %q", ErrBadKeyName, name)
		}
		keys = append(keys, Key{Name: dns.CanonicalName(name), Algorithm: a, Secret: raw})
	}
	if serr != nil {
		return nil, fmt.Errorf("tsig: parse key file: %w", serr)
	}
	if len(keys) == 0 {
		return nil, errors.New("tsig: parse key file: no key statement")
	}
	return keys, nil
}

func stripHashComments(data []byte) []byte {
	var out bytes.Buffer
	for _, line := range bytes.SplitAfter(data, []byte("\n")) {
		if i := bytes.IndexByte(line, '#'); i >= 0 && !bytes.Contains(line[:i], []byte(`"`)) {
			out.Write(line[:i])
			out.WriteByte('\n')
			continue
		}
		out.Write(line)
	}
	return out.Bytes()
}

// ReadFile reads the single key in a BIND key file.
func ReadFile(path string) (Key, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Key{}, fmt.Errorf("tsig: read key file: %w", err)
	}
	keys, err := ParseBIND(data)
	if err != nil {
		return Key{}, fmt.Errorf("%s: %w", path, err)
	}
	if len(keys) != 1 {
		return Key{}, fmt.Errorf("tsig: read key file %s: want one key, found %d", path, len(keys))
	}
	return keys[0], nil
}

// WriteFile writes the key to path in BIND format with mode 0600, atomically
// (temporary file, fsync, rename).
func WriteFile(path string, k Key) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".key-*")
	if err != nil {
		return fmt.Errorf("tsig: write key file: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("tsig: write key file: %w", err)
	}
	if _, err := f.WriteString(k.BINDClause()); err != nil {
		f.Close()
		return fmt.Errorf("tsig: write key file: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("tsig: write key file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("tsig: write key file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("tsig: write key file: %w", err)
	}
	return nil
}
