package keying

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// TestHardLifetimeRemovesSAs: after the first keying, b stops answering
// (every rekey times out). a and b keep the pair until its hard end
// (HardLifetime after the keying), then both remove it (ErrExpired), and a
// keeps trying. The pair is rekeyed in time when b answers again.
func TestHardLifetimeRemovesSAs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		var cut atomic.Bool
		n.tap = func(from, to netip.AddrPort, b []byte) []byte {
			if cut.Load() {
				return nil
			}
			return b
		}
		life := func(c *Config) { c.SALifetime, c.HardLifetime = 10*time.Minute, 15*time.Minute }
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), life)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), life)
		b.peers(t, peerA)
		a.peers(t, peerB)
		time.Sleep(time.Second)
		first := a.status(t)
		if !first.Established || !first.HardEnd.Equal(first.At.Add(15*time.Minute)) {
			t.Fatalf("status %+v, want hard end 15 min after keying", first)
		}
		cut.Store(true)
		time.Sleep(15*time.Minute - 2*time.Second)
		synctest.Wait()
		if _, ok := a.rec.peer(ulaB); !ok {
			t.Fatal("a removed the SAs before their hard end")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		for name, nd := range map[string]*node{"a": a, "b": b} {
			if _, ok := nd.rec.peer(map[string]netip.Addr{"a": ulaB, "b": ulaA}[name]); ok {
				t.Errorf("%s still has the SAs after their hard end: %q", name, nd.rec.Calls())
			}
			st := nd.status(t)
			if st.Established || !errors.Is(st.LastError, ErrExpired) {
				t.Errorf("%s: %+v, want not established, ErrExpired", name, st)
			}
			t.Logf("%s: %v", name, st.LastError)
		}
		cut.Store(false)
		time.Sleep(10 * time.Minute) // backoff up to 5 min between attempts
		synctest.Wait()
		if !a.status(t).Established || !b.status(t).Established {
			t.Errorf("not keyed again: a %+v b %+v", a.status(t), b.status(t))
		}
	})
}

// TestRekeyBeforeHardEnd: a hard lifetime shorter than the soft one moves
// the rekey before it, so a working pair never reaches its hard end.
func TestRekeyBeforeHardEnd(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		life := func(c *Config) { c.SALifetime, c.HardLifetime = time.Hour, 5*time.Minute }
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), life)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), life)
		b.peers(t, peerA)
		a.peers(t, peerB)
		time.Sleep(time.Second)
		first := a.status(t)
		if want := first.At.Add(4 * time.Minute); !first.RekeyAt.Equal(want) {
			t.Errorf("rekey at %v, want %v (80%% of the hard lifetime)", first.RekeyAt, want)
		}
		time.Sleep(30 * time.Minute)
		synctest.Wait()
		for _, nd := range []*node{a, b} {
			if st := nd.status(t); !st.Established || errors.Is(st.LastError, ErrExpired) {
				t.Errorf("%+v", st)
			}
			for _, c := range nd.rec.Calls() {
				if strings.HasPrefix(c, "remove") {
					t.Errorf("SAs removed although every rekey succeeded: %q", nd.rec.Calls())
				}
			}
		}
		if HardLimit(Config{HardLifetime: 5 * time.Minute}) != 6*time.Minute {
			t.Error("HardLimit is not the hard lifetime plus a minute")
		}
	})
}

// TestOldVersionRefused: a version 1 INIT (the format of btmm before forward
// secrecy) gets a version 1 ERROR its sender can read, no longer than the
// INIT, saying to upgrade; the peer's status and the log say why.
func TestOldVersionRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newMemNet()
		lg, logs := testLogger(t)
		b := startNode(t, n, "b", ulaB, addrB, mustPSK(t, psk1), func(c *Config) { c.Logger = lg })
		var answers [][]byte
		n.tap = func(from, to netip.AddrPort, p []byte) []byte {
			if to == addrA {
				answers = append(answers, bytes.Clone(p))
			}
			return nil
		}
		n.endpoint(addrA.String())
		b.peers(t, peerA)
		v1 := unhex(t, `01 01 02 00 0102030405060708
			01 0020 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
			02 0004 00001234
			03 0010 fd00000000000000000000000000000a
			04 0002 0102
			06 0008 0000000065000000
			ff 0020 bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb`)
		n.inject(addrA, addrB, v1)
		synctest.Wait()
		var got []byte
		for _, p := range answers {
			if p[0] == 1 {
				got = p
			}
		}
		if got == nil {
			t.Fatalf("no version 1 answer: %x", answers)
		}
		if len(got) > len(v1) || got[1] != byte(MsgError) || !bytes.Equal(got[4:12], v1[4:12]) || got[headerLen] != attrError {
			t.Fatalf("answer %x", got)
		}
		if code := int(got[headerLen+3])<<8 | int(got[headerLen+4]); code != int(CodeMalformed) ||
			!strings.Contains(string(got[headerLen+5:]), "upgrade btmmd") {
			t.Errorf("answer code %d text %q", code, got[headerLen+5:])
		}
		if err := b.status(t).LastError; !errors.Is(err, ErrVersion) {
			t.Errorf("LastError = %v, want ErrVersion", err)
		}
		logs.mu.Lock()
		defer logs.mu.Unlock()
		if !strings.Contains(logs.buf.String(), "version 1 INIT") {
			t.Error("the refusal is not logged")
		}
	})
}

// TestReplayCacheSurvivesRestart: b answers a's INIT, stops and starts
// again with the same replay file; the INIT replayed to the new b is
// refused (authenticated ERROR, nothing installed). A damaged file is moved
// aside and b refuses INITs made before its start for two skew windows.
func TestReplayCacheSurvivesRestart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "replay")
		n := newMemNet()
		var init [][]byte
		n.tap = func(from, to netip.AddrPort, p []byte) []byte {
			if msgType(p) == MsgInit && from == addrA && init == nil || msgType(p) == MsgInit && from == addrA && len(init) == 1 {
				init = append(init, bytes.Clone(p))
			}
			if msgType(p) == MsgInit && from == addrB {
				return nil
			}
			return p
		}
		withFile := func(c *Config) { c.ReplayFile = file }
		a := startNode(t, n, "a", ulaA, addrA, mustPSK(t, psk1), nil)
		ra := newRecorder("b1")
		ep := n.endpoint(addrB.String())
		b1, err := New(Config{ULA: ulaB, Auth: mustPSK(t, psk1), Transport: ep, Installer: ra, ReplayFile: file})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { b1.Run(ctx); close(done) }()
		if err := b1.SetPeers(ctx, []PeerConfig{peerA}); err != nil {
			t.Fatal(err)
		}
		a.peers(t, peerB)
		time.Sleep(time.Second)
		if _, ok := ra.peer(ulaA); !ok || len(init) != 2 {
			t.Fatalf("no keying (%d INIT datagrams captured)", len(init))
		}
		cancel()
		<-done
		ep.Close()
		if _, err := os.Stat(file); err != nil {
			t.Fatalf("no replay file: %v", err)
		}
		time.Sleep(time.Minute) // past the response cache, inside the skew
		attacker := netip.MustParseAddrPort("10.6.6.6:4500")
		var toAttacker []Message
		n.setTap(func(from, to netip.AddrPort, p []byte) []byte {
			var m Message
			if to == attacker && m.Unmarshal(p) == nil {
				toAttacker = append(toAttacker, m)
			}
			if msgType(p) == MsgInit {
				return nil
			}
			return p
		})
		n.endpoint(attacker.String())
		b2 := startNode(t, n, "b2", ulaB, addrB, mustPSK(t, psk1), withFile)
		b2.peers(t, peerA)
		for _, d := range init {
			n.inject(attacker, addrB, d)
		}
		synctest.Wait()
		if len(toAttacker) != 1 || toAttacker[0].Type != MsgError || toAttacker[0].Code != CodeReplay || toAttacker[0].MAC == nil {
			t.Fatalf("answers to the replay after restart: %+v", toAttacker)
		}
		if c := b2.rec.Calls(); len(c) != 0 {
			t.Errorf("the replay installed %q", c)
		}

		// A damaged file: blind for two skew windows.
		if err := os.WriteFile(file, []byte("BTMMRPL1 garbage"), 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := loadReplayCache(file, time.Now(), 5*time.Minute)
		if err == nil || !strings.Contains(err.Error(), ".corrupt") {
			t.Fatalf("damaged file: %v", err)
		}
		if _, err := os.Stat(file + ".corrupt"); err != nil {
			t.Errorf("damaged file not kept: %v", err)
		}
		now := time.Now()
		if err := c.check("k", now.Add(-time.Second), now); !errors.Is(err, ErrReplay) {
			t.Errorf("an INIT made before the restart: %v", err)
		}
		if err := c.check("k", now.Add(6*time.Minute), now.Add(6*time.Minute)); err != nil {
			t.Errorf("an INIT made after start + skew: %v", err)
		}
		if err := c.check("k", now.Add(-time.Second), now.Add(11*time.Minute)); err != nil {
			t.Errorf("blind after two skew windows: %v", err)
		}
	})
}
