#!/usr/bin/env bash
# Run our iotests (tests/qemu-iotests/) together with upstream iotests that
# exercise snapshots, drains, block jobs and migration, through QEMU's own
# "check" script against the patched build.
#
# Our iotests are also part of patches/ (so that they go upstream with the
# series); the copies in qemu/ must be the ones in tests/qemu-iotests/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
export PATH=$VMSNAP_CACHE/venv/bin:$PATH

# Upstream tests that touch what the series changes: internal and external
# snapshots (057 068 267 286 qcow2-internal-snapshots), drained sections
# and jobs (040 041 129 144 156 185 graph-changes-while-io
# iothreads-commit-active), migration and savevm (182 201 202 208 234 254
# 260 273 280).
UPSTREAM_TESTS=(040 041 057 068 129 144 156 182 185 201 202 208 234 254
  260 267 273 280 286 qcow2-internal-snapshots iothreads-commit-active
  graph-changes-while-io)

ours=()
for t in "$here"/tests/qemu-iotests/tests/*; do
  case $t in *.out) continue ;; esac
  name=$(basename "$t")
  for f in "$name" "$name.out"; do
    cmp -s "$here/tests/qemu-iotests/tests/$f" \
      "$here/qemu/tests/qemu-iotests/tests/$f" ||
      die "qemu/tests/qemu-iotests/tests/$f differs from tests/qemu-iotests/tests/$f;
commit the change in qemu/ and run 'make patches'"
  done
  ours+=("$name")
done

cd "$here/qemu/build/tests/qemu-iotests"
./check -qcow2 "${ours[@]}" "${UPSTREAM_TESTS[@]}" "$@"
