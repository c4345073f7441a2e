package keying

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Every error this package returns for a refused or failed
// exchange wraps exactly one of these, so callers (and btmmctl) can tell the
// user what to fix with errors.Is.
var (
	// ErrUnknownPrincipal: the KDC does not know a principal (ours or the
	// peer's), or the peer authenticated as a principal that is not the one
	// configured for its ULA. Fix: kadmin addprinc / the peer's principal name.
	ErrUnknownPrincipal = errors.New("unknown Kerberos principal")
	// ErrClockSkew: the two clocks (or ours and the KDC's) differ by more than
	// the allowed skew. Fix: run NTP.
	ErrClockSkew = errors.New("clock skew too large")
	// ErrWrongKeytab: a keytab does not hold the key the KDC used (stale kvno
	// after a re-key, wrong host's keytab). Fix: re-export the keytab.
	ErrWrongKeytab = errors.New("keytab does not match the KDC's key")
	// ErrTicketExpired: the service ticket presented has expired.
	ErrTicketExpired = errors.New("Kerberos ticket expired")
	// ErrKDCUnreachable: no KDC answered. Fix: check krb5.conf's kdc and the network.
	ErrKDCUnreachable = errors.New("KDC unreachable")
	// ErrReplay: an AP-REQ (or PSK INIT) was seen before.
	ErrReplay = errors.New("replayed keying message")
	// ErrTampered: a message's MAC or AP-REP did not verify.
	ErrTampered = errors.New("keying message failed authentication")
	// ErrMalformed: a message could not be parsed.
	ErrMalformed = errors.New("malformed keying message")
	// ErrUnknownPeer: a message came from a ULA we have no peer for.
	ErrUnknownPeer = errors.New("unknown peer")
	// ErrNoProposal: no ESP transform acceptable to both sides.
	ErrNoProposal = errors.New("no acceptable ESP transform")
	// ErrWrongMode: one host uses Kerberos, the other a pre-shared key.
	ErrWrongMode = errors.New("peer uses a different authentication mode")
	// ErrTimeout: the peer never answered (after all retransmissions).
	ErrTimeout = errors.New("peer did not answer")
	// ErrPeerRefused: the peer sent an ERROR (unauthenticated: a hint).
	ErrPeerRefused = errors.New("peer refused the exchange")
	// ErrInstall: the dataplane refused the SAs.
	ErrInstall = errors.New("installing SAs failed")
	// ErrBadSecret: the pre-shared-key file is missing, too short or readable by others.
	ErrBadSecret = errors.New("unusable pre-shared key file")
	// ErrVersion: the peer speaks another keying protocol version (version
	// 1 has no forward secrecy). Fix: run the same btmmd release on both.
	ErrVersion = errors.New("peer speaks another keying protocol version")
	// ErrExpired: a peer's SAs reached their hard end (hard lifetime, the
	// age of the login behind them, or the ticket's end) and no rekey
	// succeeded, so they were removed. A revoked host ends up here.
	ErrExpired = errors.New("SAs expired without a successful rekey")
)

// reasons names the sentinels for metrics (Stats.Failures), most specific
// first: a timeout that carries a peer's refusal counts as the refusal.
var reasons = []struct {
	err  error
	name string
}{
	{ErrUnknownPrincipal, "unknown_principal"}, {ErrClockSkew, "clock_skew"}, {ErrWrongKeytab, "wrong_keytab"},
	{ErrTicketExpired, "ticket_expired"}, {ErrKDCUnreachable, "kdc_unreachable"}, {ErrReplay, "replay"},
	{ErrWrongMode, "wrong_mode"}, {ErrVersion, "version"}, {ErrNoProposal, "no_proposal"}, {ErrBadSecret, "bad_secret"},
	{ErrInstall, "install"}, {ErrExpired, "expired"}, {ErrTampered, "tampered"}, {ErrMalformed, "malformed"},
	{ErrUnknownPeer, "unknown_peer"}, {ErrPeerRefused, "peer_refused"}, {ErrTimeout, "timeout"},
}

// Reason is a failed exchange's reason as a metric label: the name of the
// sentinel err wraps (snake_case), "other" for none.
func Reason(err error) string {
	for _, r := range reasons {
		if errors.Is(err, r.err) {
			return r.name
		}
	}
	return "other"
}

// codeFor maps a refusal to the ERROR code sent back to the initiator.
func codeFor(err error) ErrorCode {
	switch {
	case errors.Is(err, ErrClockSkew):
		return CodeClockSkew
	case errors.Is(err, ErrReplay):
		return CodeReplay
	case errors.Is(err, ErrTicketExpired):
		return CodeTicketExpired
	case errors.Is(err, ErrWrongKeytab):
		return CodeWrongKeytab
	case errors.Is(err, ErrNoProposal):
		return CodeNoProposal
	case errors.Is(err, ErrMalformed):
		return CodeMalformed
	case errors.Is(err, ErrUnknownPeer), errors.Is(err, ErrUnknownPrincipal):
		return CodeUnknownPeer
	case errors.Is(err, ErrInstall):
		return CodeInternal
	case errors.Is(err, ErrWrongMode):
		return CodeWrongMode
	}
	return CodeAuthFailed
}

// sentinelFor maps an ERROR code received from a peer to a sentinel.
func sentinelFor(c ErrorCode) error {
	switch c {
	case CodeClockSkew:
		return ErrClockSkew
	case CodeReplay:
		return ErrReplay
	case CodeTicketExpired:
		return ErrTicketExpired
	case CodeWrongKeytab:
		return ErrWrongKeytab
	case CodeNoProposal:
		return ErrNoProposal
	case CodeMalformed:
		return ErrMalformed
	case CodeUnknownPeer:
		return ErrUnknownPeer
	case CodeWrongMode:
		return ErrWrongMode
	case CodeInternal:
		return ErrInstall
	}
	return ErrTampered
}

// classifyKerberos maps a gokrb5 error (whose KRB-ERROR codes survive only
// as text once gokrb5 wraps them) to one of our sentinels, keeping the
// original text. It returns err unchanged when nothing matches.
func classifyKerberos(op string, err error) error {
	if err == nil {
		return nil
	}
	s := err.Error()
	var sentinel error
	switch {
	case strings.Contains(s, "PRINCIPAL_UNKNOWN"):
		sentinel = ErrUnknownPrincipal
	case strings.Contains(s, "SKEW"):
		sentinel = ErrClockSkew
	case strings.Contains(s, "TKT_EXPIRED"):
		sentinel = ErrTicketExpired
	case strings.Contains(s, "PREAUTH_FAILED"), strings.Contains(s, "BAD_INTEGRITY"),
		strings.Contains(s, "matching key not found in keytab"), strings.Contains(s, "BADKEYVER"),
		strings.Contains(s, "integrity verification failed"), strings.Contains(s, "checksum"):
		sentinel = ErrWrongKeytab
	case strings.Contains(s, "communicate with KDC"), strings.Contains(s, "sending to a KDC"),
		strings.Contains(s, "error sending to"), strings.Contains(s, "no KDCs defined"),
		strings.Contains(s, "connection refused"), strings.Contains(s, "i/o timeout"):
		sentinel = ErrKDCUnreachable
	}
	if sentinel == nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: %w: %w", op, sentinel, err)
}
