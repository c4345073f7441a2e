package server_test

import (
	"net"
	"testing"
)

// Benchmarks are reported, not asserted: hack/bench/list names them
// (BenchmarkLLQFanout here, BenchmarkStores and BenchmarkManyHosts in
// replica_bench_test.go, which replaced the in-process UPDATE-rate and
// heap-per-host benchmarks with the real daemons).

// freeDNSPortB returns a 127.0.0.1 address whose UDP and TCP ports are free.
func freeDNSPortB(b *testing.B) string {
	for range 50 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		addr := pc.LocalAddr().String()
		ln, err := net.Listen("tcp", addr)
		pc.Close()
		if err == nil {
			ln.Close()
			return addr
		}
	}
	b.Fatal("no free port")
	return ""
}
