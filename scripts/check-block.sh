#!/usr/bin/env bash
# "make check-block" as upstream means it, on the patched build: the whole
# "auto" group for qcow2 (what upstream's make check-block runs) and for
# raw, plus our iotests (tests/qemu-iotests/) and the upstream iotests
# outside "auto" that exercise what the series touches.  Prints the
# pass/fail/not-run counts of each format at the end.
#
# Our iotests are also part of patches/ (so that they go upstream with the
# series); the copies in qemu/ must be the ones in tests/qemu-iotests/.
#
# Arguments, if any, replace the test selection (e.g. "block-drain 040").
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
export PATH=$VMSNAP_CACHE/venv/bin:$PATH

# Upstream tests outside "auto" that touch what the series changes:
# snapshots, drained sections and jobs, migration and savevm, and the
# snapshot-access driver (image fleecing).
UPSTREAM_EXTRA=(041 129 156 185 201 202 208 234 254 260 273 280 286
  iothreads-commit-active graph-changes-while-io image-fleecing
  backup-discard-source)

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
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
status=0
for fmt in qcow2 raw; do
  if [ $# -gt 0 ]; then
    sel=("$@")
  elif [ $fmt = qcow2 ]; then
    sel=(-g auto "${ours[@]}" "${UPSTREAM_EXTRA[@]}")
  else
    sel=(-g auto "${ours[@]}")
  fi
  note "iotests -$fmt ${sel[*]}"
  # check has no timeout of its own: a hung test must fail the run, with
  # its name in the log, and leave CI time for the rest (about 10 minutes
  # for both formats on 2 cores)
  timeout -k 30 30m ./check --color=off -$fmt "${sel[@]}" 2>&1 |
    tee "$log/$fmt" || status=1
done

# One summary line per format, from check's own per-test status lines
# (a test's start and end share a line, separated by a carriage return).
for fmt in qcow2 raw; do
  tr '\r' '\n' < "$log/$fmt" | awk -v fmt=$fmt '
    $2 ~ /^(pass|fail|not)$/ && $1 !~ /^(Not|Some|Failures|Passed)/ {
      n[$2 == "not" ? "notrun" : $2]++ }
    END { printf "check-block -%s: %d passed, %d failed, %d not run\n",
                 fmt, n["pass"], n["fail"], n["notrun"] }'
  grep -h '^Not run:\|^Failures:' "$log/$fmt" | sed "s/^/  -$fmt /" || true
done
# The diffs of the failures again, last, where a log's tail shows them
for fmt in qcow2 raw; do
  tr '\r' '\n' < "$log/$fmt" | awk -v fmt=$fmt '
    $2 == "..." { show = 0 }
    $2 == "fail" && $1 !~ /^(Not|Some|Failures|Passed)/ {
      show = 1; lines = 0; print "  -" fmt " " $0; next }
    show && lines++ < 80 { print "    " $0 }'
done
exit $status
