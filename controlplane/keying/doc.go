// Package keying is btmm's key exchange (RFC 6281 §7.1, §7.3.1): hosts of one
// user authenticate each other with Kerberos and agree on ESP keys before any
// SA exists, replacing BTMM's racoon (IKEv1 with the FQDN as pre-shared key).
//
// The exchange (version 2) is IKE-like and runs over the tunnel UDP port,
// behind the RFC 3948 non-ESP marker (four zero bytes) so the kernel's
// ESP-in-UDP socket hands it to userspace:
//
//	INIT      I -> R  nonce_i, SPI_i, ULA_i, proposal, AP-REQ | PSK time, X25519_i, ML-KEM ek; MAC; MAC1 [MAC2]
//	RESP      R -> I  nonce_r, SPI_r, ULA_r, cipher, AP-REP, ticket end, X25519_r, ML-KEM ct; MAC (over INIT too)
//	CONFIRM   I -> R  MAC   (I has installed the new SAs: R may switch its outbound SA)
//	ACK       R -> I  MAC   (I may drop its old inbound SA after a short hold)
//	DELETE    either  SPIs; MAC (on shutdown)
//	ERROR     R -> I  code, text; MAC when R authenticated the INIT (else only a hint)
//	COOKIE    R -> I  sealed cookie (R is under load: send the INIT again with MAC2)
//	FRAGMENT  either  a piece of an INIT or RESP (every datagram stays under 1200 bytes)
//	MOVED     either  ULA, seq; MAC under the current pair (the sender's address changed)
//	MOVED_ACK         ULA, seq; MAC (over the MOVED too)
//
// ESP keys are HKDF-SHA-256 (RFC 5869) of the authentication secret (the
// Kerberos subkey or the pre-shared key) and of both ephemeral shared
// secrets (X25519 and ML-KEM-768: forward secrecy, post-quantum hybrid),
// over the transcript, bound to both SPIs, both ULAs and the transform, one
// per direction. Datagrams that make a responder work without state pass a
// cheap MAC1, a per-source rate limit and, under load, a cookie first. See
// docs/keying.md for the design, the threat model, exactly what each MAC
// covers, the timers and the error list.
package keying
