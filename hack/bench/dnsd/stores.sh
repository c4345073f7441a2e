#!/bin/sh
# btmm-dnsd store benchmarks (reported, never asserted; root: network namespaces; needs
# etcd-server, etcd-client and bind9):
#  - BenchmarkStores: signed updates/s (4 and 16 clients) and LLQ push p50/p99 for btmm-dnsd on its embedded
#    store vs three btmm-dnsd replicas on a three-member etcd cluster vs BIND 9 named, the
#    real daemons in one run, BTMM_BENCH_ROUNDS (default 5) alternated rounds; the per-round
#    lines are benchstat-compatible, the summary gives median, min and max;
#  - BenchmarkManyHosts: BTMM_BENCH_HOSTS (default 100,000) registered hosts with 4 records
#    each, embedded and etcd, BTMM_BENCH_ROUNDS alternated rounds: start-up time, resident
#    memory, LLQ push p50/p99.
set -eu
cd "$(dirname "$0")/../../.."
go test -run '^$' -count=1 -timeout 60m -bench "${BENCH:-BenchmarkStores|BenchmarkManyHosts}" \
	-benchtime 1x ./dns/server/ 2>&1 | grep -v '^time=' | grep -E '^Benchmark|median|^(ok|FAIL|PASS)|_test.go'
