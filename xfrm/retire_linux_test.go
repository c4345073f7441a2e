package xfrm

import (
	"context"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// TestRekeyRetiresOutboundAfterGrace: a rekey replaces the outbound SA; the
// old one stays for OutboundGrace (packets that already picked it are not
// dropped), then goes by itself. A peer that leaves loses its SAs at once.
func TestRekeyRetiresOutboundAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		k := newFakeKernel()
		d := newFake(t, k, Config{})
		// The reaper changes the fake kernel from its own goroutine under
		// d.mu; read it under the same lock.
		render := func() string {
			d.mu.Lock()
			defer d.mu.Unlock()
			return mustRender(t, k)
		}
		has := func(spi string) bool { return strings.Contains(render(), "spi 0x0000"+spi+" ") }

		if _, err := d.Set(ctx, stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1001), gcm(0x1002)))); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Set(ctx, stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1011), gcm(0x1012), gcm(0x1002)))); err != nil {
			t.Fatal(err)
		}
		if !has("1011") || !has("1001") {
			t.Fatalf("right after the rekey want old and new outbound SAs:\n%s", render())
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if !has("1001") {
			t.Fatal("old outbound SA gone before its grace period")
		}
		time.Sleep(1500 * time.Millisecond)
		synctest.Wait()
		if has("1001") || !has("1011") || !has("1002") {
			t.Fatalf("after the grace period want only the new outbound SA (and the kept inbound ones):\n%s", render())
		}

		// Rekey again, then the peer leaves within the grace period: nothing stays.
		if _, err := d.Set(ctx, stateOf(peer("b", ulaB, "10.0.0.2:4500", gcm(0x1021), gcm(0x1022)))); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Set(ctx, stateOf()); err != nil {
			t.Fatal(err)
		}
		if out := render(); strings.Contains(out, "state ") {
			t.Fatalf("SAs of a removed peer left behind:\n%s", out)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	})
}
