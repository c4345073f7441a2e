package natpmp

import "errors"

// Sentinel errors. Result codes from the gateway are the typed errors
// ResultCode (NAT-PMP) and PCPResult (PCP); test them with errors.As.
var (
	// ErrNoGateway means no gateway answered within the whole retry
	// schedule: the host is taken to be on a public network (RFC 6281 §4.1).
	ErrNoGateway = errors.New("no NAT-PMP/PCP gateway answered")
	// ErrNotNATPMP is a message whose version byte is not NAT-PMP's.
	ErrNotNATPMP = errors.New("not a NAT-PMP message")
	// ErrNotPCP is a message whose version byte is not PCP's.
	ErrNotPCP = errors.New("not a PCP message")
	// ErrClosed is returned by Run when the client was already run.
	ErrClosed = errors.New("natpmp client already run")
	// ErrNoRoute means there is no IPv4 default route to find a gateway on.
	ErrNoRoute = errors.New("no IPv4 default route")
)

// errRediscover ends a discovery exchange that Rediscover made stale.
var errRediscover = errors.New("natpmp: rediscover asked during discovery")
