package natpmp

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Wire constants shared by NAT-PMP (RFC 6886) and PCP (RFC 6887).
const (
	// ServerPort is where the gateway listens for requests (both protocols).
	ServerPort = 5351
	// ClientPort is where clients listen for multicast announcements
	// (224.0.0.1:5350, RFC 6886 §3.2.1 and RFC 6887 §14.1.1).
	ClientPort = 5350

	// VersionNATPMP is the NAT-PMP version byte.
	VersionNATPMP = 0
	// VersionPCP is the PCP version byte.
	VersionPCP = 2

	// NAT-PMP opcodes (a response sets the high bit).
	OpExternalAddress = 0
	OpMapUDP          = 1
	OpMapTCP          = 2
	opResponse        = 0x80

	// PCP opcodes (the R bit, 0x80, marks a response).
	PCPOpAnnounce = 0
	PCPOpMap      = 1

	natpmpAddrRespLen = 12
	natpmpMapReqLen   = 12
	natpmpMapRespLen  = 16
	natpmpErrRespLen  = 8
	pcpHeaderLen      = 24
	pcpMapLen         = 36
	pcpMaxLen         = 1100
)

// Protocol is an IP protocol a mapping is for.
type Protocol uint8

// Protocols that can be mapped (the PCP protocol field holds the IANA number).
const (
	UDP Protocol = 17
	TCP Protocol = 6
)

func (p Protocol) String() string {
	switch p {
	case UDP:
		return "udp"
	case TCP:
		return "tcp"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

func (p Protocol) natpmpOp() (uint8, error) {
	switch p {
	case UDP:
		return OpMapUDP, nil
	case TCP:
		return OpMapTCP, nil
	}
	return 0, fmt.Errorf("natpmp: %v cannot be mapped with NAT-PMP", p)
}

// ResultCode is a NAT-PMP result code (RFC 6886 §3.5). A non-zero code is
// an error.
type ResultCode uint16

// NAT-PMP result codes.
const (
	ResultSuccess            ResultCode = 0
	ResultUnsupportedVersion ResultCode = 1
	ResultNotAuthorized      ResultCode = 2
	ResultNetworkFailure     ResultCode = 3
	ResultOutOfResources     ResultCode = 4
	ResultUnsupportedOpcode  ResultCode = 5
)

var resultNames = [...]string{"SUCCESS", "UNSUPPORTED_VERSION", "NOT_AUTHORIZED", "NETWORK_FAILURE",
	"OUT_OF_RESOURCES", "UNSUPPORTED_OPCODE"}

func (r ResultCode) String() string {
	if int(r) < len(resultNames) {
		return resultNames[r]
	}
	return fmt.Sprintf("RESULT_%d", uint16(r))
}

func (r ResultCode) Error() string { return "NAT-PMP result " + r.String() }

// PCPResult is a PCP result code (RFC 6887 §7.4). A non-zero code is an error.
type PCPResult uint8

// PCP result codes.
const (
	PCPSuccess               PCPResult = 0
	PCPUnsuppVersion         PCPResult = 1
	PCPNotAuthorized         PCPResult = 2
	PCPMalformedRequest      PCPResult = 3
	PCPUnsuppOpcode          PCPResult = 4
	PCPUnsuppOption          PCPResult = 5
	PCPMalformedOption       PCPResult = 6
	PCPNetworkFailure        PCPResult = 7
	PCPNoResources           PCPResult = 8
	PCPUnsuppProtocol        PCPResult = 9
	PCPUserExQuota           PCPResult = 10
	PCPCannotProvideExternal PCPResult = 11
	PCPAddressMismatch       PCPResult = 12
	PCPExcessiveRemotePeers  PCPResult = 13
)

var pcpResultNames = [...]string{"SUCCESS", "UNSUPP_VERSION", "NOT_AUTHORIZED", "MALFORMED_REQUEST",
	"UNSUPP_OPCODE", "UNSUPP_OPTION", "MALFORMED_OPTION", "NETWORK_FAILURE", "NO_RESOURCES",
	"UNSUPP_PROTOCOL", "USER_EX_QUOTA", "CANNOT_PROVIDE_EXTERNAL", "ADDRESS_MISMATCH",
	"EXCESSIVE_REMOTE_PEERS"}

func (r PCPResult) String() string {
	if int(r) < len(pcpResultNames) {
		return pcpResultNames[r]
	}
	return fmt.Sprintf("RESULT_%d", uint8(r))
}

func (r PCPResult) Error() string { return "PCP result " + r.String() }

// Response is a NAT-PMP response: to an external address request (Op 128,
// also the format of announcements) or to a mapping request (Op 129/130).
// When Result is not success only Op, Result and Epoch are meaningful
// (RFC 6886 §3.5 leaves the rest unspecified).
type Response struct {
	Op           uint8 // with the response bit set
	Result       ResultCode
	Epoch        uint32 // seconds since start of epoch
	External     netip.Addr
	InternalPort uint16
	ExternalPort uint16
	Lifetime     uint32 // seconds
}

// BuildExternalAddressRequest returns a NAT-PMP external address request.
func BuildExternalAddressRequest() []byte { return []byte{VersionNATPMP, OpExternalAddress} }

// BuildMapRequest returns a NAT-PMP mapping request. A lifetime of zero
// deletes the mapping (then RFC 6886 §3.4 wants external port zero).
func BuildMapRequest(p Protocol, internalPort, externalPort uint16, lifetime uint32) ([]byte, error) {
	op, err := p.natpmpOp()
	if err != nil {
		return nil, err
	}
	b := make([]byte, natpmpMapReqLen)
	b[0], b[1] = VersionNATPMP, op
	binary.BigEndian.PutUint16(b[4:], internalPort)
	binary.BigEndian.PutUint16(b[6:], externalPort)
	binary.BigEndian.PutUint32(b[8:], lifetime)
	return b, nil
}

// ParseResponse parses a NAT-PMP response (or announcement).
func ParseResponse(b []byte) (Response, error) {
	var r Response
	if len(b) < natpmpErrRespLen {
		return r, fmt.Errorf("natpmp: parse response: %d bytes, want at least %d", len(b), natpmpErrRespLen)
	}
	if b[0] != VersionNATPMP {
		return r, fmt.Errorf("natpmp: parse response: version %d: %w", b[0], ErrNotNATPMP)
	}
	r.Op = b[1]
	if r.Op&opResponse == 0 {
		return r, fmt.Errorf("natpmp: parse response: opcode %d is a request", r.Op)
	}
	r.Result = ResultCode(binary.BigEndian.Uint16(b[2:]))
	r.Epoch = binary.BigEndian.Uint32(b[4:])
	if r.Result != ResultSuccess {
		return r, nil
	}
	switch r.Op &^ opResponse {
	case OpExternalAddress:
		if len(b) < natpmpAddrRespLen {
			return r, fmt.Errorf("natpmp: parse external address response: %d bytes, want %d", len(b), natpmpAddrRespLen)
		}
		r.External = netip.AddrFrom4([4]byte(b[8:12]))
	case OpMapUDP, OpMapTCP:
		if len(b) < natpmpMapRespLen {
			return r, fmt.Errorf("natpmp: parse mapping response: %d bytes, want %d", len(b), natpmpMapRespLen)
		}
		r.InternalPort = binary.BigEndian.Uint16(b[8:])
		r.ExternalPort = binary.BigEndian.Uint16(b[10:])
		r.Lifetime = binary.BigEndian.Uint32(b[12:])
	default:
		return r, fmt.Errorf("natpmp: parse response: unknown opcode %d", r.Op)
	}
	return r, nil
}

// MarshalBinary encodes r as the gateway would send it (a test gateway and
// the fuzz round trip use it).
func (r Response) MarshalBinary() ([]byte, error) {
	if r.Op&opResponse == 0 {
		return nil, fmt.Errorf("natpmp: marshal response: opcode %d is a request", r.Op)
	}
	hdr := func(n int) []byte {
		b := make([]byte, n)
		b[0], b[1] = VersionNATPMP, r.Op
		binary.BigEndian.PutUint16(b[2:], uint16(r.Result))
		binary.BigEndian.PutUint32(b[4:], r.Epoch)
		return b
	}
	if r.Result != ResultSuccess {
		return hdr(natpmpErrRespLen), nil
	}
	switch r.Op &^ opResponse {
	case OpExternalAddress:
		if !r.External.Is4() {
			return nil, fmt.Errorf("natpmp: marshal response: external address %v is not IPv4", r.External)
		}
		b := hdr(natpmpAddrRespLen)
		a := r.External.As4()
		copy(b[8:], a[:])
		return b, nil
	case OpMapUDP, OpMapTCP:
		b := hdr(natpmpMapRespLen)
		binary.BigEndian.PutUint16(b[8:], r.InternalPort)
		binary.BigEndian.PutUint16(b[10:], r.ExternalPort)
		binary.BigEndian.PutUint32(b[12:], r.Lifetime)
		return b, nil
	}
	return nil, fmt.Errorf("natpmp: marshal response: unknown opcode %d", r.Op)
}

// PCPMap is the MAP opcode data (RFC 6887 §11.1): in a request the
// suggested external port and address, in a response the assigned ones.
type PCPMap struct {
	Nonce        [12]byte
	Protocol     Protocol
	InternalPort uint16
	ExternalPort uint16
	External     netip.Addr // IPv4 addresses travel IPv4-mapped
}

// PCPOption is one PCP option (RFC 6887 §7.3), kept opaque.
type PCPOption struct {
	Code uint8
	Data []byte
}

// PCPResponse is a PCP response (RFC 6887 §7.2): ANNOUNCE or MAP.
type PCPResponse struct {
	Opcode   uint8 // without the R bit
	Result   PCPResult
	Lifetime uint32
	Epoch    uint32
	Map      PCPMap // valid when Opcode is PCPOpMap and the message carried it
	Options  []PCPOption
}

func putAddr16(b []byte, a netip.Addr) {
	if !a.IsValid() {
		a = netip.IPv4Unspecified()
	}
	s := a.As16() // IPv4 becomes ::ffff:a.b.c.d
	copy(b, s[:])
}

func getAddr16(b []byte) netip.Addr {
	return netip.AddrFrom16([16]byte(b[:16])).Unmap()
}

// BuildPCPMapRequest returns a PCP MAP request from client (the address
// the gateway sees as our source) for m, asking for lifetime seconds (zero
// deletes, with the same nonce).
func BuildPCPMapRequest(client netip.Addr, m PCPMap, lifetime uint32) []byte {
	b := make([]byte, pcpHeaderLen+pcpMapLen)
	b[0], b[1] = VersionPCP, PCPOpMap
	binary.BigEndian.PutUint32(b[4:], lifetime)
	putAddr16(b[8:], client)
	d := b[pcpHeaderLen:]
	copy(d, m.Nonce[:])
	d[12] = uint8(m.Protocol)
	binary.BigEndian.PutUint16(d[16:], m.InternalPort)
	binary.BigEndian.PutUint16(d[18:], m.ExternalPort)
	putAddr16(d[20:], m.External)
	return b
}

// BuildPCPAnnounceRequest returns a PCP ANNOUNCE request (RFC 6887 §14.1),
// which a client may send to learn the epoch and whether PCP is spoken.
func BuildPCPAnnounceRequest(client netip.Addr) []byte {
	b := make([]byte, pcpHeaderLen)
	b[0], b[1] = VersionPCP, PCPOpAnnounce
	putAddr16(b[8:], client)
	return b
}

// ParsePCPResponse parses a PCP response. A NAT-PMP-only gateway answers a
// PCP request with a version 0 UNSUPPORTED_VERSION response; that parses as
// Result PCPUnsuppVersion so the caller can fall back.
func ParsePCPResponse(b []byte) (PCPResponse, error) {
	var r PCPResponse
	if len(b) >= 4 && b[0] == VersionNATPMP {
		nr, err := ParseResponse(b)
		if err != nil {
			return r, fmt.Errorf("pcp: parse response: %w", err)
		}
		if nr.Result == ResultUnsupportedVersion {
			r.Opcode, r.Result, r.Epoch = nr.Op&^opResponse, PCPUnsuppVersion, nr.Epoch
			return r, nil
		}
		return r, fmt.Errorf("pcp: parse response: NAT-PMP answer %v: %w", nr.Result, ErrNotPCP)
	}
	if len(b) < pcpHeaderLen {
		return r, fmt.Errorf("pcp: parse response: %d bytes, want at least %d", len(b), pcpHeaderLen)
	}
	if len(b) > pcpMaxLen || len(b)%4 != 0 {
		return r, fmt.Errorf("pcp: parse response: bad length %d", len(b))
	}
	if b[0] != VersionPCP {
		return r, fmt.Errorf("pcp: parse response: version %d: %w", b[0], ErrNotPCP)
	}
	if b[1]&0x80 == 0 {
		return r, fmt.Errorf("pcp: parse response: opcode %d is a request", b[1])
	}
	r.Opcode = b[1] &^ 0x80
	r.Result = PCPResult(b[3])
	r.Lifetime = binary.BigEndian.Uint32(b[4:])
	r.Epoch = binary.BigEndian.Uint32(b[8:])
	rest := b[pcpHeaderLen:]
	switch r.Opcode {
	case PCPOpAnnounce:
	case PCPOpMap:
		// Error responses may be truncated to the header (RFC 6887 §7.2
		// says they copy the request): parsed, but without a nonce no
		// client can take them as the answer to its request.
		if len(rest) < pcpMapLen {
			if r.Result == PCPSuccess {
				return r, fmt.Errorf("pcp: parse MAP response: %d bytes of opcode data, want %d", len(rest), pcpMapLen)
			}
			break
		}
		copy(r.Map.Nonce[:], rest)
		r.Map.Protocol = Protocol(rest[12])
		r.Map.InternalPort = binary.BigEndian.Uint16(rest[16:])
		r.Map.ExternalPort = binary.BigEndian.Uint16(rest[18:])
		r.Map.External = getAddr16(rest[20:])
		rest = rest[pcpMapLen:]
	default:
		if r.Result == PCPSuccess {
			return r, fmt.Errorf("pcp: parse response: unknown opcode %d", r.Opcode)
		}
		rest = nil
	}
	for len(rest) > 0 {
		if len(rest) < 4 {
			return r, fmt.Errorf("pcp: parse option: %d stray bytes", len(rest))
		}
		n := int(binary.BigEndian.Uint16(rest[2:]))
		padded := (n + 3) &^ 3
		if len(rest) < 4+padded {
			return r, fmt.Errorf("pcp: parse option %d: length %d overruns the message", rest[0], n)
		}
		r.Options = append(r.Options, PCPOption{Code: rest[0], Data: append([]byte(nil), rest[4:4+n]...)})
		rest = rest[4+padded:]
	}
	return r, nil
}

// MarshalBinary encodes r as a PCP server would.
func (r PCPResponse) MarshalBinary() ([]byte, error) {
	if r.Opcode&0x80 != 0 {
		return nil, fmt.Errorf("pcp: marshal response: opcode %d out of range", r.Opcode)
	}
	b := make([]byte, pcpHeaderLen, pcpHeaderLen+pcpMapLen)
	b[0], b[1], b[3] = VersionPCP, r.Opcode|0x80, uint8(r.Result)
	binary.BigEndian.PutUint32(b[4:], r.Lifetime)
	binary.BigEndian.PutUint32(b[8:], r.Epoch)
	switch r.Opcode {
	case PCPOpAnnounce:
	case PCPOpMap:
		if r.Result != PCPSuccess && r.Map == (PCPMap{}) {
			break // an error answer cut to the header
		}
		d := make([]byte, pcpMapLen)
		copy(d, r.Map.Nonce[:])
		d[12] = uint8(r.Map.Protocol)
		binary.BigEndian.PutUint16(d[16:], r.Map.InternalPort)
		binary.BigEndian.PutUint16(d[18:], r.Map.ExternalPort)
		putAddr16(d[20:], r.Map.External)
		b = append(b, d...)
	default:
		if len(r.Options) > 0 || r.Result == PCPSuccess {
			return nil, fmt.Errorf("pcp: marshal response: unknown opcode %d", r.Opcode)
		}
	}
	for _, o := range r.Options {
		if len(o.Data) > 0xffff {
			return nil, fmt.Errorf("pcp: marshal option %d: %d bytes", o.Code, len(o.Data))
		}
		h := []byte{o.Code, 0, 0, 0}
		binary.BigEndian.PutUint16(h[2:], uint16(len(o.Data)))
		b = append(b, h...)
		b = append(b, o.Data...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
	}
	if len(b) > pcpMaxLen {
		return nil, fmt.Errorf("pcp: marshal response: %d bytes exceeds %d", len(b), pcpMaxLen)
	}
	return b, nil
}
