#!/usr/bin/env bash
# make check-install: "make install" into a scratch DESTDIR, then use only
# what it installed.  The test guest boots from the installed
# qemu-system-x86_64 with no -L, so the firmware has to come from the
# prefix's own data dir (not from the build's qemu-bundle/), up to the
# workload agent's READY; the installed tools and vmsnap have to run too.
# Prints one line of what was checked; exits non-zero on any failure.
#
#   PREFIX             the prefix to install for (default /usr/local)
#   VMSNAP_QEMU_BUILD  the build directory (default qemu/build)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
PREFIX=${PREFIX:-/usr/local}
PREFIX=${PREFIX%/}
export VMSNAP_QEMU_BUILD=${VMSNAP_QEMU_BUILD:-$here/qemu/build}
build=$(realpath "$VMSNAP_QEMU_BUILD")
start=$(date +%s.%N)

# Short, so that the agent's unix socket path fits.
work=$(mktemp -d /tmp/vmsnap-check-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
dest=$work/destdir
DESTDIR=$dest PREFIX=$PREFIX "$here/scripts/install.sh"
bin=$dest$PREFIX/bin

# The search path must be the prefix's, with nothing of the build in it.
search=$("$bin/qemu-system-x86_64" -L help)
if grep -qF "$build" <<<"$search"; then
  die "the installed qemu-system-x86_64 searches the build tree:
$search"
fi

PYTHONPATH=$here/python:$here/tests/lib "$VMSNAP_CACHE/venv/bin/python3" - \
    "$bin/qemu-system-x86_64" "$work" > "$work/boot.txt" <<'EOF'
import os
import subprocess
import sys
import time

from vmsnaptest import guest

qemu, work = sys.argv[1:]
# The accelerator guest.probe_accel() finds for the build's binary, of
# which the installed one is a copy: probing the copy would boot once more
# on every run (the probe's cache is keyed by the binary's path) and
# replace the answer cached for the build's binary.
accel = guest.probe_accel()
sock = os.path.join(work, 'agent.sock')
console, qemu_log = (os.path.join(work, f) for f in ('console.log', 'qemu.log'))
try:
    argv = guest.qemu_args(qemu=qemu, firmware_dirs=(), accel=accel,
                           agent_socket=sock, console_log=console)
except FileNotFoundError as e:
    sys.exit(f'error: {e}')
start = time.monotonic()
with open(qemu_log, 'wb') as log:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
try:
    with guest.Agent(sock, proc=proc) as agent:
        ev = agent.wait_ready(timeout=180)
except (OSError, RuntimeError, TimeoutError, EOFError) as e:
    tails = []
    for path in (qemu_log, console):
        try:
            with open(path, errors='replace') as f:
                tails.append(f'{os.path.basename(path)}: '
                             + ' | '.join(f.read().splitlines()[-10:]))
        except OSError:
            pass
    sys.exit(f'error: the guest did not come up from {qemu} without -L: '
             f'{e}; ' + '; '.join(tails))
finally:
    proc.kill()
    proc.wait()
print(f'{ev.text} after {ev.time - start:.1f} s ({accel})')
EOF
ready=$(cat "$work/boot.txt")
case $ready in READY*|TICK*) ;; *) die "no READY from the guest: $ready" ;; esac

versions=()
for t in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
  v=$("$bin/$t" --version | head -1)
  # "qemu-img version 10.2.2", but "/path/to/qemu-nbd 10.2.2"
  grep -qE " ${QEMU_VERSION//./\\.}\$" <<<"$v" || die "$bin/$t --version: $v"
  versions+=("$t")
done
# vmsnap --help, and that it was the prefix's copy of the package that
# ran, not the one setup-host.sh installed into the venv.
help=$(PYTHONVERBOSE=1 "$bin/vmsnap" --help 2> "$work/vmsnap-imports.txt") ||
  die "$bin/vmsnap --help failed: $(tail -5 "$work/vmsnap-imports.txt")"
grep -q drain-snapshot <<<"$help" || die "$bin/vmsnap --help: $help"
grep -qF "$dest$PREFIX/lib/vmsnap/python/vmsnap/__init__.py" "$work/vmsnap-imports.txt" ||
  die "$bin/vmsnap did not run the installed vmsnap package"

echo "check-install: PREFIX=$PREFIX under a scratch DESTDIR;" \
  "guest booted from bin/qemu-system-x86_64 without -L: agent $ready;" \
  "${versions[*]} --version $QEMU_VERSION; vmsnap --help;" \
  "$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s in all"
