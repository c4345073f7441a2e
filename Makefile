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
# The VM tier's per-package limit: internal/e2e runs the daemons of several
# hosts under TCG (roaming, self-healing, a 5-minute idle NAT keepalive test
# in parallel) and needs more than a host-kernel package. The VM itself is
# killed a little after it (BTMM_VM_TIMEOUT, seconds).
VM_TIMEOUT ?= 25m
VM_KILL ?= 1620

.PHONY: install deb all build generate generate-check lint test test-unit test-netns test-vm bench bench-vm bench-report demo deps clean

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
	BTMM_VM_TIMEOUT=$(VM_KILL) BTMM_REQUIRE_ALL=1 BTMM_BIN_DIR=$(CURDIR)/bin $(GOTESTSUM) --jsonfile $(TESTOUT)/vm.json -- -count=1 -timeout $(VM_TIMEOUT) -exec $(CURDIR)/hack/vmexec $(VM_PKGS)
	BTMM_VM_TIMEOUT=$(VM_KILL) BTMM_VM_INIT=systemd BTMM_REQUIRE_ALL=1 BTMM_BIN_DIR=$(CURDIR)/bin $(GOTESTSUM) --jsonfile $(TESTOUT)/vm-systemd.json -- -count=1 -timeout $(VM_TIMEOUT) -exec $(CURDIR)/hack/vmexec $(VM_SYSTEMD_PKGS)
	cat $(TESTOUT)/vm-systemd.json >> $(TESTOUT)/vm.json
	$(SKIPCHECK) -vm $(TESTOUT)/vm.json

# Every tier this machine supports (CI runs this), then the cross-check: each
# test the netns tier deferred to the VM passed there, and the reverse.
test: test-netns test-vm
	$(SKIPCHECK) -netns $(TESTOUT)/netns.json -vm $(TESTOUT)/vm.json

# Benchmarks are reported as ratios against a baseline measured in the same
# run, never asserted (docs/benchmarks.md). Each command of hack/bench/list
# alternates its cases over BTMM_BENCH_ROUNDS (>= 5) rounds and prints
# benchstat lines; hack/bench/run collects them with the command, date,
# machine and load into docs/bench/{host,vm}.txt (compare two commits with
# benchstat), and bench-report turns them into docs/benchmarks.md.
# BENCH_ONLY=regexp runs only the matching commands of the list.
bench: build
	BTMM_BIN_DIR=$(CURDIR)/bin hack/bench/run host
	$(MAKE) bench-report

# The VM tier's benchmarks (Debian 6.1 under qemu TCG, BTMM_VM_CPU=max: only
# ratios within one VM run mean anything), one qemu at a time.
bench-vm: build
	BTMM_BIN_DIR=$(CURDIR)/bin flock /tmp/btmm-vm.lock hack/bench/run vm
	$(MAKE) bench-report

bench-report:
	$(GO) run ./hack/bench/report docs/bench/host.txt docs/bench/vm.txt

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
	rm -rf bin bench.txt bench-vm.txt bench-*.log test-results
