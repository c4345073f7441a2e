package main

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/btmm/btmm/dns/server"
	"github.com/btmm/btmm/dns/store"
)

// errDamaged makes `check` exit non-zero after printing its report.
var errDamaged = errors.New("the store is damaged (see above)")

// check prints the state of the embedded store in data_dir/store without
// changing anything.
func check(cfg server.Config, stdout io.Writer) error {
	rep, err := store.Check(filepath.Join(cfg.DataDir, "store"))
	if err != nil {
		return err
	}
	if _, err := io.WriteString(stdout, rep.String()); err != nil {
		return err
	}
	if rep.Damage != nil {
		return errDamaged
	}
	return nil
}

// repair keeps a copy of the damaged store files and salvages every intact
// record; the server must be stopped.
func repair(cfg server.Config, stdout io.Writer) error {
	rr, err := store.Repair(filepath.Join(cfg.DataDir, "store"), time.Now())
	if err != nil {
		return err
	}
	_, err = fmt.Fprint(stdout, rr)
	return err
}
