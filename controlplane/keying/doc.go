// Package keying is btmm's key exchange (RFC 6281 §7.1, §7.3.1): hosts of one
// user authenticate each other with Kerberos and agree on ESP keys before any
// SA exists, replacing BTMM's racoon (IKEv1 with the FQDN as pre-shared key).
//
// The exchange is IKE-like and runs over the tunnel UDP port, behind the
// RFC 3948 non-ESP marker (four zero bytes) so the kernel's ESP-in-UDP socket
// hands it to userspace:
//
//	INIT    I -> R  nonce_i, SPI_i, ULA_i, proposal, AP-REQ (with subkey) | PSK time; MAC
//	RESP    R -> I  nonce_r, SPI_r, ULA_r, cipher, AP-REP, ticket end; MAC (over INIT too)
//	CONFIRM I -> R  MAC   (I has installed the new SAs: R may switch its outbound SA)
//	ACK     R -> I  MAC   (I may drop its old inbound SA after a short hold)
//	DELETE  either  SPIs; MAC (on shutdown)
//	ERROR   R -> I  code, text (unauthenticated: ends an attempt, changes no SA)
//	MOVED   either  ULA, seq; MAC under the current pair (the sender's address changed)
//	MOVED_ACK       ULA, seq; MAC (over the MOVED too)
//
// ESP keys are HKDF-SHA-256 (RFC 5869) of the Kerberos subkey (or the
// pre-shared key), salted with both nonces, bound to both SPIs, both ULAs and
// the transform, one per direction. See docs/keying.md for the full design,
// the retransmission, rekey and tie-break rules, and the error list.
package keying
