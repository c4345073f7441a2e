package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/btmm/btmm/dns/store"
	"github.com/btmm/btmm/dns/store/etcdstore"
)

// openStore opens the configured store: the embedded one in DataDir/store,
// or the etcd one (whose replica-local LLQ state still lives there).
func (s *Server) openStore() (store.Store, error) {
	local, err := store.OpenOptions(filepath.Join(s.cfg.DataDir, "store"), store.Options{Log: s.log, OnSync: s.cfg.OnStoreSync})
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if s.cfg.Store != "etcd" {
		return local, nil
	}
	e := s.cfg.Etcd
	tlsCfg, err := etcdTLS(e)
	if err != nil {
		local.Close()
		return nil, err
	}
	// No overall deadline: the initial read goes in pages, each bounded by
	// request_timeout, so a large store loads as long as etcd answers.
	st, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: e.Endpoints, TLS: tlsCfg, Prefix: e.Prefix,
		DialTimeout: time.Duration(e.DialTimeout), RequestTimeout: time.Duration(e.RequestTimeout),
		SessionTTL: time.Duration(e.SessionTTL), Guard: s.zone.UserOf, Local: local, Log: s.log})
	if err != nil {
		local.Close()
		return nil, fmt.Errorf("server: %w", err)
	}
	return st, nil
}

func etcdTLS(e EtcdConfig) (*tls.Config, error) {
	if e.CAFile == "" && e.CertFile == "" {
		for _, ep := range e.Endpoints {
			if len(ep) > 8 && ep[:8] == "https://" {
				return &tls.Config{MinVersion: tls.VersionTLS12}, nil
			}
		}
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if e.CAFile != "" {
		pem, err := os.ReadFile(e.CAFile)
		if err != nil {
			return nil, fmt.Errorf("server: etcd ca_file: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("server: etcd ca_file %s: no certificate", e.CAFile)
		}
	}
	if e.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(e.CertFile, e.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("server: etcd client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}
