package keying

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// TestPSKRotate: after Rotate, new exchanges use the new secret on both
// sides of the code (initiate and accept).
func TestPSKRotate(t *testing.T) {
	a, _ := NewPSK(bytes.Repeat([]byte("a"), 32))
	b, _ := NewPSK(bytes.Repeat([]byte("b"), 40))
	a.Rotate(b)
	now := time.Now()
	in, err := a.initiate(context.Background(), PeerConfig{}, now, authPolicy{})
	if err != nil || !bytes.Equal(in.secret, b.secret) {
		t.Fatalf("initiate after Rotate uses the old secret (err %v)", err)
	}
	acc, err := a.accept(&Message{Time: now.Unix(), Nonce: []byte{1}}, PeerConfig{}, now, authPolicy{})
	if err != nil || !bytes.Equal(acc.secret, b.secret) {
		t.Fatalf("accept after Rotate uses the old secret (err %v)", err)
	}
	if a.String() != "psk([40 bytes redacted])" {
		t.Fatalf("String = %q", a.String())
	}
}
