package keying

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/btmm/btmm/controlplane"
)

type fakeDP struct {
	sets []*controlplane.State
	fail error
}

func (f *fakeDP) Set(_ context.Context, s *controlplane.State) ([]controlplane.Change, error) {
	f.sets = append(f.sets, s)
	return nil, f.fail
}
func (f *fakeDP) Stats(context.Context) ([]controlplane.PeerStats, error) { return nil, nil }
func (f *fakeDP) Close() error                                            { return nil }

func TestDataplaneInstaller(t *testing.T) {
	dp := &fakeDP{}
	d := &DataplaneInstaller{DP: dp, Local: controlplane.Local{ULA: ulaA, Port: 4500}}
	key := make([]byte, 36)
	p := controlplane.Peer{Name: "b", ULA: ulaB, Outer: netip.MustParseAddrPort("10.0.0.2:4500"),
		Out: controlplane.SA{SPI: 0x1000, Cipher: controlplane.CipherAESGCM, Key: key},
		In:  controlplane.SA{SPI: 0x2000, Cipher: controlplane.CipherAESGCM, Key: key}}
	if err := d.Install(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	if len(dp.sets) != 1 || len(dp.sets[0].Peers) != 1 || dp.sets[0].Peers[0].Out.SPI != 0x1000 {
		t.Fatalf("sets: %+v", dp.sets)
	}
	// A refused update leaves (and re-applies) the previous state.
	dp.fail = errors.New("kernel says no")
	p2 := p
	p2.Out.SPI = 0x3000
	if err := d.Install(context.Background(), p2); err == nil {
		t.Fatal("Install succeeded although the dataplane refused")
	}
	if got := d.State().Peers[0].Out.SPI; got != 0x1000 {
		t.Errorf("after a refused install the desired Out is 0x%x, want 0x1000", got)
	}
	// Invalid input never reaches the dataplane.
	dp.fail = nil
	n := len(dp.sets)
	bad := p
	bad.Out.Key = key[:5]
	if err := d.Install(context.Background(), bad); err == nil {
		t.Fatal("a 5-byte GCM key was accepted")
	}
	if len(dp.sets) != n+1 { // only the restore
		t.Errorf("invalid state was handed to the dataplane: %d sets", len(dp.sets)-n)
	}
	if err := d.Remove(context.Background(), ulaB); err != nil {
		t.Fatal(err)
	}
	if last := dp.sets[len(dp.sets)-1]; len(last.Peers) != 0 {
		t.Errorf("peer still present after Remove: %+v", last.Peers)
	}
}
