package natpmp_test

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/btmm/btmm/natpmp"
)

// Keep the tunnel port mapped and publish its external endpoint whenever
// it changes.
func ExampleClient() {
	c, err := natpmp.New(natpmp.Config{
		Logger:   slog.Default(),
		Mappings: []natpmp.MappingRequest{{Protocol: natpmp.UDP, InternalPort: 4500}},
	})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	updates, unsubscribe := c.Subscribe()
	defer unsubscribe()
	go c.Run(ctx) // deletes the mapping when ctx ends
	for st := range updates {
		if ep, ok := st.Endpoint(natpmp.UDP, 4500); ok {
			fmt.Println("publish", ep)
		} else {
			fmt.Println("nothing to publish:", st)
		}
	}
}
