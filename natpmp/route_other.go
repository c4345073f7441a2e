//go:build !linux

package natpmp

import (
	"errors"
	"net/netip"
)

// DefaultRoute needs rtnetlink; elsewhere Config.Route must be given.
func DefaultRoute(any) (Route, error) {
	return Route{}, errors.New("natpmp: default route: linux only")
}

// DialGateway is Linux only in btmm.
func DialGateway(netip.AddrPort) (Conn, error) { return nil, errors.New("natpmp: linux only") }

// ListenAnnouncements is Linux only in btmm.
func ListenAnnouncements() (PacketConn, error) { return nil, errors.New("natpmp: linux only") }
