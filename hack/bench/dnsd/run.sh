#!/bin/sh
# btmm-dnsd benchmarks (reported, never asserted):
#  - TSIG-signed (hmac-sha256) UPDATEs per second, btmm-dnsd vs BIND 9 named on this machine in
#    the same run (4 concurrent clients; btmm-dnsd fsyncs before answering), and their ratio;
#  - LLQ event fan-out latency p50/p99 with 10,000 live LLQs (100 sockets x 100 names; each
#    update fans out to 100 LLQs; update sent -> event received), plus heap per LLQ;
#  - heap per registered host (AAAA + SRV + TXT + PTR) with 10,000 hosts.
# Needs: bind9 (named), Go. Takes well under a minute.
set -eu
cd "$(dirname "$0")/../../.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! go test -run '^$' -count=1 \
	-bench 'BenchmarkUpdatesVsNamed|BenchmarkLLQFanout|BenchmarkMemoryPerHost' \
	-benchtime "${BENCHTIME:-1000x}" ./dns/server/ >"$out" 2>&1; then
	cat "$out" >&2
	exit 1
fi
grep '^Benchmark' "$out"
awk '
	/^Benchmark/ {
		for (i = 3; i < NF; i += 2) m[$(i+1)] = $i
	}
	END {
		printf "updates/s: btmm-dnsd %.0f, named %.0f, ratio %.2f\n", m["btmm-updates/s"], m["named-updates/s"], m["ratio"]
		printf "LLQ fan-out (10000 LLQs): p50 %.2f ms, p99 %.2f ms, heap %d B/LLQ\n", m["p50-ms"], m["p99-ms"], m["heap-B/llq"]
		printf "memory: %d B/host\n", m["heap-B/host"]
	}' "$out"
