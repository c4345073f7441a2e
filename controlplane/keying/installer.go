package keying

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/btmm/btmm/controlplane"
)

// DataplaneInstaller is an Installer that applies every keying result to a
// controlplane.Dataplane at once and synchronously, as make-before-break
// requires: the responder's new inbound SA must be in the kernel before its
// RESP leaves. It keeps the complete desired State (Local plus one Peer per
// keyed peer) and hands all of it to Dataplane.Set each time.
type DataplaneInstaller struct {
	DP    controlplane.Dataplane
	Local controlplane.Local

	mu    sync.Mutex
	peers map[netip.Addr]controlplane.Peer
}

// Install sets p's key set; if the dataplane refuses, the previous desired
// state is restored (and re-applied) and the error returned.
func (d *DataplaneInstaller) Install(ctx context.Context, p controlplane.Peer) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.peers == nil {
		d.peers = map[netip.Addr]controlplane.Peer{}
	}
	old, had := d.peers[p.ULA]
	p.PrevIn = slices.Clone(p.PrevIn)
	d.peers[p.ULA] = p
	if err := d.apply(ctx); err != nil {
		if had {
			d.peers[p.ULA] = old
		} else {
			delete(d.peers, p.ULA)
		}
		d.apply(ctx)
		return fmt.Errorf("install SAs for %s (%v): %w", p.Name, p.ULA, err)
	}
	return nil
}

// Remove drops the peer's SAs.
func (d *DataplaneInstaller) Remove(ctx context.Context, ula netip.Addr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.peers[ula]; !ok {
		return nil
	}
	delete(d.peers, ula)
	if err := d.apply(ctx); err != nil {
		return fmt.Errorf("remove SAs for %v: %w", ula, err)
	}
	return nil
}

// State returns a copy of the desired state last handed to the dataplane.
func (d *DataplaneInstaller) State() *controlplane.State {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state()
}

func (d *DataplaneInstaller) state() *controlplane.State {
	st := &controlplane.State{Local: d.Local}
	for _, p := range d.peers {
		p.PrevIn = slices.Clone(p.PrevIn)
		st.Peers = append(st.Peers, p)
	}
	slices.SortFunc(st.Peers, func(a, b controlplane.Peer) int { return a.ULA.Compare(b.ULA) })
	return st
}

func (d *DataplaneInstaller) apply(ctx context.Context) error {
	st := d.state()
	if err := st.Validate(); err != nil {
		return err
	}
	_, err := d.DP.Set(ctx, st)
	return err
}
