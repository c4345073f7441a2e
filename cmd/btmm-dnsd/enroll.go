package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/btmm/btmm/cmd/internal/enroll"
	"github.com/btmm/btmm/dns/server"
)

const enrollUsage = `btmm-dnsd enroll [flags] USER HOST

Prints an enrollment bundle for HOST of USER (install it on the host with
btmmctl enroll FILE): this server's address, the host's own TSIG key (made
like addhost, or the existing one), the DoT CA, and keying material: with
-realm, a keytab for host/HOST.USER.ZONE@REALM made through kadmin
(addprinc -randkey, ktadd); else the user's pre-shared key from -psk-file.
The bundle holds secrets: write it to a file only you can read.

Flags:`

// enrollCommand runs `btmm-dnsd enroll`.
func enrollCommand(cfg server.Config, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("btmm-dnsd enroll", flag.ContinueOnError)
	fs.SetOutput(stderr)
	serverAddr := fs.String("server", "", "HOST:PORT hosts send updates and LLQs to (default: the first server_addrs address, listen's port)")
	realm := fs.String("realm", "", "Kerberos realm: make the host's principal and keytab with kadmin")
	kdc := fs.String("kdc", "", "the KDC as hosts reach it, HOST[:PORT] (default: the server's address)")
	kadmin := fs.String("kadmin", "kadmin.local", "kadmin command (run with -r REALM -q QUERY; kadmin.local on the KDC, or e.g. \"kadmin -k -t /etc/btmm/admin.keytab -p btmm/admin\")")
	pskFile := fs.String("psk-file", "", "the user's pre-shared key file (PSK keying, when there is no KDC)")
	fs.Usage = func() { fmt.Fprintln(fs.Output(), enrollUsage); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		fs.Usage()
		return errors.New("enroll: want USER HOST")
	}
	user, host := fs.Arg(0), fs.Arg(1)
	zone := strings.TrimSuffix(cfg.Zone, ".") + "."
	b := &enroll.Bundle{Host: host, Domain: user + "." + zone, Zone: zone}

	var err error
	if b.Server, err = advertised(cfg, *serverAddr); err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	users := server.UsersOf(cfg)
	key, err := users.GetHost(user, host)
	if err != nil {
		if key, err = users.AddHost(user, host, ""); err != nil {
			return fmt.Errorf("enroll: %w", err)
		}
		notify(cfg)
	}
	b.TSIGKey = key.BINDClause()
	if cfg.ListenTLS != "" {
		if ap, err := netip.ParseAddrPort(cfg.ListenTLS); err == nil {
			b.TLSPort = ap.Port()
		}
		certFile := cfg.TLSCert
		if certFile == "" {
			certFile = filepath.Join(cfg.DataDir, "tls", "cert.pem")
		}
		if pem, err := os.ReadFile(certFile); err == nil {
			b.CAPEM = string(pem)
		}
	}
	switch {
	case *realm != "" && *pskFile != "":
		return errors.New("enroll: -realm and -psk-file: pick one keying mode")
	case *realm != "":
		b.Realm = *realm
		b.Principal = "host/" + host + "." + strings.TrimSuffix(b.Domain, ".") + "@" + *realm
		b.KDC = *kdc
		if b.KDC == "" {
			h, _, _ := net.SplitHostPort(b.Server)
			b.KDC = h
		}
		if b.Keytab, err = kadminKeytab(*kadmin, *realm, b.Principal); err != nil {
			return fmt.Errorf("enroll: %w", err)
		}
	case *pskFile != "":
		psk, err := os.ReadFile(*pskFile)
		if err != nil {
			return fmt.Errorf("enroll: -psk-file: %w", err)
		}
		b.PSK = bytes.TrimSpace(psk)
	default:
		return errors.New("enroll: no keying material: give -realm (Kerberos, keytab through kadmin) or -psk-file")
	}
	out, err := b.Marshal()
	if err != nil {
		return err
	}
	_, err = stdout.Write(out)
	return err
}

// advertised is the server address hosts use: flag, else the first
// server_addrs address with listen's port.
func advertised(cfg server.Config, flagValue string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	_, port, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return "", fmt.Errorf("listen %q has no port: give -server HOST:PORT", cfg.Listen)
	}
	if cfg.AdvertiseDNSPort != 0 {
		port = fmt.Sprint(cfg.AdvertiseDNSPort)
	}
	if len(cfg.ServerAddrs) == 0 {
		return "", errors.New("the config has no server_addrs: give -server HOST:PORT (the address hosts reach this server at)")
	}
	return net.JoinHostPort(cfg.ServerAddrs[0], port), nil
}

// kadminKeytab makes principal (random key, if new) and returns a keytab
// with its current keys. kadmin ktadd re-randomises the key: a keytab made
// before for this principal stops working.
func kadminKeytab(kadmin, realm, principal string) ([]byte, error) {
	argv := strings.Fields(kadmin)
	if len(argv) == 0 {
		return nil, errors.New("-kadmin is empty")
	}
	run := func(query string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, argv[0], append(argv[1:], "-r", realm, "-q", query)...).CombinedOutput()
		if err != nil {
			// argv[0] only: the rest of -kadmin may hold a password (-w).
			return string(out), fmt.Errorf("%s -q %q: %w: %s", argv[0], query, err, strings.TrimSpace(string(out)))
		}
		return string(out), nil
	}
	if out, err := run("addprinc -randkey " + principal); err != nil && !strings.Contains(out, "already exists") {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "btmm-enroll-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	kt := filepath.Join(dir, "host.keytab")
	if _, err := run("ktadd -k " + kt + " " + principal); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(kt)
	if err != nil || len(b) == 0 {
		return nil, fmt.Errorf("kadmin ktadd wrote no keytab for %s: %v", principal, err)
	}
	return b, nil
}
