package relay

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// The relay-tcp path (docs/paths.md): a host whose UDP is blocked reaches
// the relay over one TLS stream (ALPN StreamALPN, port 443 by default) and
// carries on it exactly the datagrams it would have sent over UDP, framed
// in the manner of RFC 8229 §3 with the relay port added:
//
//	length (2, big endian: of what follows) | port (2) | datagram
//
// From the host, port is the relay UDP port the datagram is for: an
// allocation port (ESP, keying and probes for a peer, a Bind), or any other
// (the relay's control: Binding, Allocate, Refresh). From the relay, port
// is the relay port the datagram comes from (an allocation port, or the
// port of the request a control answer belongs to). A datagram is ESP (a
// non-zero SPI first) or starts with the non-ESP marker (RFC 3948 §2.2),
// as on UDP. On the relay a stream is one more source: it allocates, binds
// at peers' ports and is forwarded to like a UDP source, by Go (the
// kernel forwarder passes datagrams for a stream-attached host up).

// StreamALPN is the TLS application protocol of the relay's stream port.
const StreamALPN = "btmm-relay/1"

// MaxFrame is the largest datagram a frame carries (the length field is
// 16 bits and covers the port too).
const MaxFrame = 65535 - 2

// ErrFrame reports a frame that cannot be read or written.
var ErrFrame = errors.New("relay: bad stream frame")

// AppendFrame appends one frame carrying datagram for (or from) port.
func AppendFrame(dst []byte, port uint16, datagram []byte) ([]byte, error) {
	if len(datagram) == 0 || len(datagram) > MaxFrame {
		return dst, fmt.Errorf("%w: datagram of %d bytes (1..%d)", ErrFrame, len(datagram), MaxFrame)
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(datagram)+2))
	dst = binary.BigEndian.AppendUint16(dst, port)
	return append(dst, datagram...), nil
}

// ReadFrame reads one frame from r into buf (which must hold MaxFrame
// bytes) and returns the port and the datagram (a slice of buf).
func ReadFrame(r *bufio.Reader, buf []byte) (uint16, []byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:2]))
	if n <= 2 {
		return 0, nil, fmt.Errorf("%w: length %d", ErrFrame, n)
	}
	n -= 2
	if len(buf) < n {
		return 0, nil, fmt.Errorf("%w: %d-byte datagram for a %d-byte buffer", ErrFrame, n, len(buf))
	}
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return binary.BigEndian.Uint16(hdr[2:]), buf[:n], nil
}

// streamPrefix marks the sources the relay gives its streams: addresses in
// 100::/64 (RFC 6666, discard-only), which no UDP datagram comes from.
var streamPrefix = netip.MustParsePrefix("100::/64")

// streamSource is the source the relay's tables use for stream id.
func streamSource(id uint64) netip.AddrPort {
	var a [16]byte
	a[0] = 1
	binary.BigEndian.PutUint64(a[8:], id)
	return netip.AddrPortFrom(netip.AddrFrom16(a), 0)
}

// isStream reports whether a source is a stream's.
func isStream(ap netip.AddrPort) bool { return streamPrefix.Contains(ap.Addr()) }
