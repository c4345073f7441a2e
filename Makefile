# btmm — see README.md. Every target runs on a fresh machine after .ci/run's
# install step (or `make deps`). Test tiers: unit (no root), netns (root, this
# kernel), vm (Debian 6.1 kernel under qemu, via hack/vmexec).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
GO ?= go
GOTESTSUM := $(GO) tool gotestsum --format testname --format-hide-empty-pkg
# Packages with tests gated on kernel features this host may lack: they run
# again inside the VM. Found by their use of testenv.Require.
VM_PKGS = $(shell hack/vm-packages)
# Packages whose tests need systemd as PID 1 (testenv.RequireSystemd): the
# VM boots Debian's systemd for them (BTMM_VM_INIT=systemd hack/vmexec).
VM_SYSTEMD_PKGS = ./internal/installtest/
TIMEOUT ?= 15m

.PHONY: install deb all build generate generate-check lint test test-unit test-netns test-vm bench bench-vm demo deps clean

all: build

build:
	$(GO) build -ldflags "-X github.com/btmm/btmm/cmd/internal/cli.Version=$(VERSION)" -o bin/ ./cmd/...

generate:
	$(GO) generate ./...

# CI: regenerated files (bpf2go output) must match what is committed.
generate-check:
	$(GO) generate ./ebpf/...
	git diff --exit-code -- ebpf/ || \
	  { echo "generated files differ from the committed ones: run make generate and commit"; exit 1; }

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# Unit tier: no root needed; netns/vm gates skip under -short.
test-unit:
	$(GOTESTSUM) -- -race -short -count=1 -timeout $(TIMEOUT) ./...

# Every skip of the netns and vm tiers is checked against hack/skips.allow
# (hack/skipcheck reads gotestsum's --jsonfile): a skip not listed there, or a
# test deferred to the VM that the VM run did not pass, fails the run.
TESTOUT ?= $(CURDIR)/test-results
SKIPCHECK = $(GO) run ./hack/skipcheck -allow $(CURDIR)/hack/skips.allow

# netns tier (and unit): as root on this kernel. Missing tools fail, not skip.
test-netns:
	mkdir -p $(TESTOUT)
	BTMM_REQUIRE_ALL=1 $(GOTESTSUM) --jsonfile $(TESTOUT)/netns.json -- -race -count=1 -timeout $(TIMEOUT) ./...
	$(SKIPCHECK) -netns $(TESTOUT)/netns.json

# vm tier: the same test binaries inside Debian's 6.1 kernel (hack/vmexec).
# The binaries are built on the host first: compiling under TCG is slow.
# Inside the VM (BTMM_IN_VM=1) a missing kernel feature fails the test.
# VM_SYSTEMD_PKGS run in a guest that boots systemd as PID 1; their results
# join vm.json for the cross-check.
test-vm: build deb
	mkdir -p $(TESTOUT)
	BTMM_REQUIRE_ALL=1 BTMM_BIN_DIR=$(CURDIR)/bin $(GOTESTSUM) --jsonfile $(TESTOUT)/vm.json -- -count=1 -timeout $(TIMEOUT) -exec $(CURDIR)/hack/vmexec $(VM_PKGS)
	BTMM_VM_INIT=systemd BTMM_REQUIRE_ALL=1 BTMM_BIN_DIR=$(CURDIR)/bin $(GOTESTSUM) --jsonfile $(TESTOUT)/vm-systemd.json -- -count=1 -timeout $(TIMEOUT) -exec $(CURDIR)/hack/vmexec $(VM_SYSTEMD_PKGS)
	cat $(TESTOUT)/vm-systemd.json >> $(TESTOUT)/vm.json
	$(SKIPCHECK) -vm $(TESTOUT)/vm.json

# Every tier this machine supports (CI runs this), then the cross-check: each
# test the netns tier deferred to the VM passed there, and the reverse.
test: test-netns test-vm
	$(SKIPCHECK) -netns $(TESTOUT)/netns.json -vm $(TESTOUT)/vm.json

# Benchmarks are reported as ratios against a baseline measured in the same
# run, never asserted (docs/benchmarks.md). Host: dnsd vs BIND named, LLQ
# push latency, eBPF path vs raw veth, agent CPU during a transfer.
bench:
	hack/bench/dnsd/run.sh | tee bench.txt
	hack/bench/dnsd/stores.sh | tee -a bench.txt
	$(GO) test -run '^$$' -bench 'PushLatency' -benchtime 100x ./dns/peers/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench 'Throughput|AgentCPU' -benchtime 1x ./ebpf/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench 'RelayThroughput' -benchtime 1x ./ebpf/relay/ | tee -a bench.txt
	BTMM_BENCH=1 $(GO) test -count=1 -timeout 30m -run TestReconvergenceCleartext -v ./internal/e2e/ | tee -a bench.txt

# VM benchmarks (TCG: only ratios inside one VM run mean anything): ESP-in-UDP
# vs veth vs WireGuard, eBPF secure mode vs the xfrm dataplane.
bench-vm: build
	BTMM_BENCH=1 $(GO) test -count=1 -exec $(CURDIR)/hack/vmexec -run TestVMThroughputRatios -v ./xfrm/ | tee bench-vm.txt
	$(GO) test -count=1 -exec $(CURDIR)/hack/vmexec -run '^$$' -bench SecureVM -benchtime 1x ./ebpf/ | tee -a bench-vm.txt
	BTMM_BENCH=1 BTMM_BIN_DIR=$(CURDIR)/bin BTMM_VM_TIMEOUT=3600 $(GO) test -count=1 -timeout 60m -exec $(CURDIR)/hack/vmexec -run TestVMReconvergence -v ./internal/e2e/ | tee -a bench-vm.txt

demo: build
	hack/demo

# Install (PREFIX, DESTDIR as usual): binaries, systemd units (ExecStart
# pointing at PREFIX), tmpfiles, commented sample configs under /etc/btmm/.
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
install: build
	install -d $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) \
	  $(DESTDIR)$(PREFIX)/lib/tmpfiles.d $(DESTDIR)$(SYSCONFDIR)/btmm \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions
	install -m 0755 bin/btmmd bin/btmm-dnsd $(DESTDIR)$(PREFIX)/sbin/
	install -m 0755 bin/btmmctl $(DESTDIR)$(PREFIX)/bin/
	for u in btmmd btmm-dnsd; do \
	  sed 's|/usr/sbin/|$(PREFIX)/sbin/|; s|/etc/btmm/|$(SYSCONFDIR)/btmm/|g' hack/systemd/$$u.service > $(DESTDIR)$(UNITDIR)/$$u.service; \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.service; \
	  install -m 0644 hack/systemd/$$u.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/$$u.conf; \
	done
	install -m 0644 hack/packaging/btmmd.toml $(DESTDIR)$(SYSCONFDIR)/btmm/btmmd.toml.sample
	install -m 0644 hack/packaging/dnsd.toml $(DESTDIR)$(SYSCONFDIR)/btmm/dnsd.toml.sample
	install -m 0644 cmd/btmmctl/btmmctl.bash-completion $(DESTDIR)$(PREFIX)/share/bash-completion/completions/btmmctl
	@[ -n "$(DESTDIR)" ] || { systemd-tmpfiles --create btmmd.conf btmm-dnsd.conf 2>/dev/null; systemctl daemon-reload 2>/dev/null; true; }

# Debian packages btmm (btmmd, btmmctl) and btmm-dnsd in bin/, built with
# nfpm (a Go tool of this module). VERSION defaults to git describe.
VERSION ?= $(shell v=$$(git describe --tags --dirty 2>/dev/null) && echo $${v#v} || echo 0.0.0~git$$(git rev-parse --short HEAD 2>/dev/null || echo unknown))
deb: build
	rm -f bin/*.deb
	for p in btmm btmm-dnsd; do \
	  VERSION="$(VERSION)" ARCH=$$($(GO) env GOARCH) $(GO) tool nfpm package -f hack/packaging/$$p.yaml -p deb -t bin/ >/dev/null; \
	done
	@ls bin/*.deb

deps:
	hack/install-deps

clean:
	rm -rf bin bench.txt bench-vm.txt test-results
