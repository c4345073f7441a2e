// Package dnsextdtest is a test double of one behaviour of Apple's dnsextd
// (the Back to My Mac update and LLQ server of mDNSResponder, as observed
// with its POSIX build 1556.80.2): it never signs what it sends back. It
// accepts TSIG-signed requests, but its answers to them and its LLQ events
// carry no TSIG, and the signatures of the requests it passes on are
// stripped. It is not dnsextd: it is a UDP relay in front of a real
// btmm-dnsd that produces exactly that wire behaviour, so that btmm's
// clients (dns/register, dns/llqclient) can be tested against it.
//
// Each client address gets an upstream socket of its own, so the upstream's
// LLQ events for a client come back through the relay to that client. The
// relay re-signs every request with Key (a key the upstream accepts for the
// user, as dnsextd holds the zone's key), and strips every TSIG from what it
// relays back.
package dnsextdtest

import (
	"errors"
	"net"
	"sync"
	"time"

	"github.com/btmm/btmm/dns/tsig"
	"github.com/miekg/dns"
)

// Relay is a running double. Addr is where clients send.
type Relay struct {
	Addr string

	pc       net.PacketConn
	upstream *net.UDPAddr
	key      tsig.Key
	mu       sync.Mutex
	clients  map[string]*net.UDPConn
	wg       sync.WaitGroup
	// Stripped counts the TSIGs removed from what went back to clients.
	stripped int
}

// Start relays 127.0.0.1:0 to upstream, re-signing requests with key.
func Start(upstream string, key tsig.Key) (*Relay, error) {
	ua, err := net.ResolveUDPAddr("udp", upstream)
	if err != nil {
		return nil, err
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &Relay{Addr: pc.LocalAddr().String(), pc: pc, upstream: ua, key: key, clients: map[string]*net.UDPConn{}}
	r.wg.Add(1)
	go r.serve()
	return r, nil
}

// Stripped returns how many signatures the relay removed on the way back.
func (r *Relay) Stripped() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stripped
}

// Close stops the relay.
func (r *Relay) Close() error {
	r.pc.Close()
	r.mu.Lock()
	for _, c := range r.clients {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
	return nil
}

func (r *Relay) serve() {
	defer r.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, from, err := r.pc.ReadFrom(buf)
		if err != nil {
			return
		}
		m := new(dns.Msg)
		if m.Unpack(buf[:n]) != nil {
			continue
		}
		up := r.upstreamFor(from)
		if up == nil {
			continue
		}
		// Strip the client's signature, sign with the relay's key.
		if m.IsTsig() != nil {
			m.Extra = m.Extra[:len(m.Extra)-1]
		}
		m.SetTsig(r.key.Name, r.key.Algorithm, 300, time.Now().Unix())
		b, _, err := dns.TsigGenerateWithProvider(m, r.key.Provider(), "", false)
		if err != nil {
			continue
		}
		up.Write(b)
	}
}

// upstreamFor returns the client's upstream socket, starting its reader.
func (r *Relay) upstreamFor(client net.Addr) *net.UDPConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.clients[client.String()]; ok {
		return c
	}
	c, err := net.DialUDP("udp", nil, r.upstream)
	if err != nil {
		return nil
	}
	r.clients[client.String()] = c
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		buf := make([]byte, 65535)
		for {
			n, err := c.Read(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				continue // ICMP port unreachable while the upstream restarts
			}
			m := new(dns.Msg)
			if m.Unpack(buf[:n]) != nil {
				continue
			}
			if m.IsTsig() != nil {
				m.Extra = m.Extra[:len(m.Extra)-1]
				r.mu.Lock()
				r.stripped++
				r.mu.Unlock()
			}
			b, err := m.Pack()
			if err != nil {
				continue
			}
			r.pc.WriteTo(b, client)
		}
	}()
	return c
}
