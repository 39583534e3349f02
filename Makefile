# Live VM snapshots for QEMU: build the patched QEMU and the test guest,
# run the demo, the tests and the benchmarks.  See README.md.

VMSNAP_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vmsnap
export VMSNAP_CACHE
VENV_PY := $(VMSNAP_CACHE)/venv/bin/python3
AVOCADO := $(VMSNAP_CACHE)/venv/bin/avocado
RUN_PY := PYTHONPATH=$(CURDIR)/python:$(CURDIR)/tests/lib $(VENV_PY)
# make install: where the installed files are used from, and a staging
# root prepended to every path written (for packaging).
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all setup qemu build guest install demo check check-block \
	check-migration check-guest check-series check-install check-rbd \
	patches bench bench-delta clean

# Default: host packages and venv, QEMU source with patches/ applied,
# the patched build and the test guest.
all: setup qemu build guest

setup:
	scripts/setup-host.sh

qemu: setup
	scripts/fetch-qemu.sh

build: qemu
	scripts/build-qemu.sh

guest: setup
	scripts/build-guest.sh

# The patched QEMU binaries, their firmware and the vmsnap command into
# $(DESTDIR)$(PREFIX), e.g. for libvirt's <emulator>.
install: build
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' scripts/install.sh

# Boot the guest, drain + snapshot it live, boot the snapshot and check it.
demo: all
	$(RUN_PY) scripts/demo.py

# Everything CI runs.
check: check-block check-migration check-guest check-rbd check-series \
	check-install

# Our iotests plus the upstream iotests we must not break.
check-block: build
	scripts/check-block.sh

# Upstream's migration qtests (migration-test --full) for the transports
# and code the series touches, under TCG with /dev/kvm hidden.
check-migration: build
	scripts/check-migration.sh

# Guest-level tests: results checked inside the guest by the agent.
check-guest: all
	PYTHONPATH=$(CURDIR)/python:$(CURDIR)/tests/lib $(AVOCADO) run --max-parallel-tasks=1 \
		--job-results-dir=$(VMSNAP_CACHE)/avocado tests/guest/

# make install into a scratch DESTDIR; the test guest boots from the
# installed QEMU with its own firmware; the installed tools run.
check-install: build guest
	PREFIX='$(PREFIX)' scripts/check-install.sh

# The VM state saved into and loaded from rbd images of a throwaway
# one-node Ceph cluster (scripts/ceph-cluster.sh), stopped afterwards.
# Skipped, with the reason, where QEMU has no rbd driver.
check-rbd: build
	scripts/check-rbd.sh

# checkpatch.pl, and every prefix of patches/ builds.
check-series: qemu
	scripts/check-series.sh

# Regenerate patches/ from the commits in qemu/.
patches:
	scripts/regen-patches.sh

# Stop/cont versus drain, then VM state saves (ours and upstream's),
# side by side, with ratios.
bench: all
	$(RUN_PY) scripts/bench.py
	$(RUN_PY) scripts/bench-delta.py

# Only the incremental backup between two internal snapshots
bench-delta: build
	$(RUN_PY) scripts/bench-delta.py

clean:
	rm -rf qemu/build
