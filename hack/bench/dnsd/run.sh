#!/bin/sh
# btmm-dnsd benchmarks (reported, never asserted):
#  - TSIG-signed (hmac-sha256) UPDATEs per second, btmm-dnsd vs BIND 9 named on this machine in
#    the same run (4 concurrent clients; btmm-dnsd fsyncs before answering), and their ratio;
#  - heap per registered host (AAAA + SRV + TXT + PTR) with 10,000 hosts;
#  - LLQ event fan-out with 10,000 hosts (dns/server/llqfanout_bench_test.go): one update to all
#    10,000 LLQs, and 2,500 users x 4 hosts with random updates; latency p50/p99/max and the
#    real btmm-dnsd's CPU per event.
# Needs: bind9 (named), Go. Output: benchstat-compatible lines.
set -eu
cd "$(dirname "$0")/../../.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! go test -run '^$' -count=1 -bench 'BenchmarkUpdatesVsNamed|BenchmarkMemoryPerHost' \
	-benchtime "${BENCHTIME:-1000x}" ./dns/server/ >"$out" 2>&1 ||
	! go test -run '^$' -count=1 -bench 'BenchmarkLLQFanout' -benchtime 1x ./dns/server/ >>"$out" 2>&1; then
	cat "$out" >&2
	exit 1
fi
grep '^Benchmark' "$out"
