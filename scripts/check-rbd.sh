#!/usr/bin/env bash
# make check-rbd: the tests of tests/rbd/ (VM state into and out of rbd
# images) on one throwaway Ceph cluster (scripts/ceph-cluster.sh, under
# $VMSNAP_CEPH_DIR, default $VMSNAP_CACHE/ceph-check), stopped and
# removed afterwards however the tests end.  Without the Ceph daemons
# installed, or with a QEMU build that has no rbd driver, the tests are
# skipped, with the reason.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
export VMSNAP_CEPH_DIR=${VMSNAP_CEPH_DIR:-$VMSNAP_CACHE/ceph-check}
cluster=$here/scripts/ceph-cluster.sh

if command -v ceph-mon > /dev/null && command -v ceph-osd > /dev/null; then
  trap '"$cluster" stop' EXIT
  t0=$SECONDS
  while IFS='=' read -r name value; do
    case $name in
      VMSNAP_CEPH_CONF|VMSNAP_CEPH_POOL) export "$name=$value" ;;
    esac
  done < <("$cluster" start)
  [ -n "${VMSNAP_CEPH_CONF:-}" ] || die "ceph-cluster.sh start gave no ceph.conf"
  note "ceph: cluster ready after $((SECONDS - t0)) s"
else
  note "no Ceph daemons installed (ceph-mon, ceph-osd): the rbd tests skip"
fi

PYTHONPATH=$here/python:$here/tests/lib "$VMSNAP_CACHE/venv/bin/avocado" run \
  --max-parallel-tasks=1 --job-results-dir="$VMSNAP_CACHE/avocado" \
  "$here/tests/rbd/"
