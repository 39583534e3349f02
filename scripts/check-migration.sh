#!/usr/bin/env bash
# Upstream's own migration qtests (tests/qtest/migration-test --full) on
# the patched build, as a migration maintainer runs them on a series that
# changes migration.c, ram.c and the options: one test per process, then
# a summary line with the counts and the time.  Exits non-zero if a test
# fails, times out or is not registered.
#
# Two passes:
#
#  - q35, upstream's machine for these tests on x86_64, for the groups
#    the series touches: the file: transport with its offset, fdset and
#    mapped-ram variants (the block-node transport shares mapped-ram's
#    code, which patches 8 and 10 change in ram.c), multifd with
#    mapped-ram into a file, the fd: transport and the plain unix socket
#    precopy, plus bad_dest and the URI/channels validation, the parts of
#    migration.c that the new URI scheme goes through.  About 36 s a
#    test: 32 s of it is the source VM's SeaBIOS waiting for the AHCI
#    disk (Debian 12's SeaBIOS 1.16.2 times out on QEMU's answer to an
#    IDENTIFY PACKET DEVICE to a hard disk, "WARNING - Timeout at
#    ahci_command"), so this pass is kept to the groups above.
#  - pc (i440fx, IDE instead of AHCI, no such wait), for every test that
#    migration-test --full registers here, those above included: postcopy
#    and its recovery, TLS, multifd over TCP with compression, cancel
#    from every state, the UUID checks.  About 3 s a test.
#
# Measured on the development machine (2 shared cores, TCG): the 17
# tests on q35 in 9 minutes, the 78 on pc in 3; 12 minutes in all.
#
# The tests run under TCG, in a private mount namespace whose /dev has no
# kvm node: this host's /dev/kvm (kvm_pvm, nested) opens and runs a guest,
# but precopy/unix/plain took 95 s there against 35 s under TCG, and the
# tests' "-accel kvm -accel tcg" falls back to TCG only when /dev/kvm is
# missing.  Upstream registers dirty_ring and mode/* only with KVM, so
# they do not run.  VMSNAP_ACCEL=kvm leaves /dev/kvm visible.
#
# Arguments, if any, replace both passes: test paths as listed by
# "migration-test -l --full", with or without the /x86_64/migration/
# prefix, run on q35, or on pc when written pc:PATH.
#
# VMSNAP_QEMU_TREE: the QEMU tree whose build/ is used (default qemu/).
# VMSNAP_MIGRATION_TIMEOUT: seconds for the whole run (default 1500);
# VMSNAP_MIGRATION_TEST_TIMEOUT: seconds for one test (default 300).
# Each test's output is kept in $VMSNAP_CACHE/check-migration/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"

Q35_TESTS=(
  precopy/file
  precopy/file/offset
  precopy/file/offset/fdset
  precopy/file/offset/bad
  precopy/file/mapped-ram
  precopy/file/mapped-ram/live
  multifd/file/mapped-ram
  multifd/file/mapped-ram/live
  multifd/file/mapped-ram/dio
  multifd/file/mapped-ram/fdset
  multifd/file/mapped-ram/fdset/dio
  precopy/fd/tcp
  precopy/fd/file
  precopy/unix/plain
  bad_dest
  validate_uri/channels/both_set
  validate_uri/channels/none_set
)

tree=${VMSNAP_QEMU_TREE:-$here/qemu}
tree=$(cd "$tree" && pwd)
build=$tree/build
total_timeout=${VMSNAP_MIGRATION_TIMEOUT:-1500}
test_timeout=${VMSNAP_MIGRATION_TEST_TIMEOUT:-300}

# --- Inside the mount namespace: hide /dev/kvm, run the tests. ---------
if [ "${1:-}" = --in-namespace ]; then
  shift
  log=$1 logs=$2; shift 2
  if [ "${VMSNAP_ACCEL:-}" != kvm ]; then
    # A tmpfs over /dev with only what QEMU and the test use, bound
    # from the real /dev; the namespace keeps these mounts to itself.
    mount --make-rprivate /
    dev=$(mktemp -d)
    mount -t tmpfs -o mode=755,nosuid vmsnap-dev "$dev"
    for n in null zero full random urandom tty ptmx userfaultfd fuse; do
      [ -e "/dev/$n" ] || continue
      touch "$dev/$n"
      mount --bind "/dev/$n" "$dev/$n"
    done
    for d in pts shm; do
      [ -d "/dev/$d" ] || continue
      mkdir "$dev/$d"
      mount --rbind "/dev/$d" "$dev/$d"
    done
    ln -s /proc/self/fd "$dev/fd"
    ln -s /proc/self/fd/0 "$dev/stdin"
    ln -s /proc/self/fd/1 "$dev/stdout"
    ln -s /proc/self/fd/2 "$dev/stderr"
    mount --move "$dev" /dev
    rmdir "$dev"
    [ ! -e /dev/kvm ] || die "/dev/kvm is still visible in the namespace"
    # The tests' "-accel kvm -accel tcg" must now get TCG.
    accel=$(printf '%s\n' '{"execute":"qmp_capabilities"}' \
        '{"execute":"query-kvm"}' '{"execute":"quit"}' |
      timeout 60 "$build/qemu-system-x86_64" -accel kvm -accel tcg \
        -machine q35 -display none -nodefaults -qmp stdio 2>/dev/null |
      grep -o '"enabled": [a-z]*' || true)
    [ "$accel" = '"enabled": false' ] ||
      die "QEMU does not fall back to TCG without /dev/kvm (query-kvm: ${accel:-no answer})"
    note "migration-test under TCG (/dev/kvm hidden)"
  else
    note "migration-test with /dev/kvm visible (VMSNAP_ACCEL=kvm)"
  fi

  # The overall timeout or a Ctrl-C ends the test that is running too.
  child=
  trap '[ -z "$child" ] || kill -TERM "$child" 2>/dev/null; exit 143' TERM INT HUP
  export QTEST_QEMU_BINARY=$build/qemu-system-x86_64
  # The loadvm tests make their qcow2 images with it, as "meson test"
  # sets it.
  export QTEST_QEMU_IMG=$build/qemu-img
  # analyze-script runs scripts/analyze-migration.py (relative to the
  # build directory) with $PYTHON, as "meson test" sets it.
  export PYTHON=$build/pyvenv/bin/python3
  cd "$build"
  # What this build registers here (some tests depend on the host).
  ./tests/qtest/migration-test -l --full 2>/dev/null | grep '^/' > "$log/list" ||
    die "migration-test -l --full failed"
  specs=("$@")
  if [ ${#specs[@]} -eq 0 ]; then
    for t in "${Q35_TESTS[@]}"; do
      specs+=("q35:/x86_64/migration/$t")
    done
    while read -r t; do
      specs+=("pc:$t")
    done < "$log/list"
  fi
  for spec in "${specs[@]}"; do
    machine=${spec%%:*} t=${spec#*:}
    if ! grep -qxF "$t" "$log/list"; then
      printf '%-4s %-60s %-8s %4ds\n' "$machine" "$t" missing 0 |
        tee -a "$log/results"
      continue
    fi
    # -p also runs the tests below this one in the tree: skip those.
    skips=()
    while read -r sub; do
      skips+=(-s "$sub")
    done < <(awk -v p="$t/" 'index($0, p) == 1' "$log/list")
    start=$SECONDS
    rc=0
    # timeout(1) runs in a process group of its own: in the background,
    # so that the trap below can pass it a TERM (the QEMUs go with
    # migration-test: exit-with-parent).
    QTEST_QEMU_MACHINE_TYPE=$machine timeout -k 10 "$test_timeout" \
      ./tests/qtest/migration-test --full -p "$t" "${skips[@]}" \
      > "$log/out" 2>&1 &
    child=$!
    wait "$child" || rc=$?
    child=
    secs=$((SECONDS - start))
    cp "$log/out" "$logs/$machine-$(echo "${t#/x86_64/migration/}" | tr / _).log"
    # This very test's TAP line (the skipped ones below it have theirs).
    line=$(awk -v t="$t" '($1 == "ok" && $3 == t) ||
      ($1 == "not" && $2 == "ok" && $4 == t) { print; exit }' "$log/out")
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      res=timeout
    elif [ -z "$line" ] || [[ $line == "not ok"* ]]; then
      res=fail
    elif [[ $line == *"# SKIP"* ]]; then
      res="skip (${line#*# SKIP })"
    elif [ $rc -ne 0 ]; then
      res=fail
    else
      res=pass
    fi
    printf '%-4s %-60s %-8s %4ds\n' "$machine" "$t" "$res" "$secs" |
      tee -a "$log/results"
    if [ "$res" != pass ] && [[ $res != skip* ]]; then
      tail -n 40 "$log/out" | sed 's/^/    | /'
    fi
  done
  exit 0
fi

# --- Outside: build, then the namespace under one overall timeout. ------
[ -f "$build/build.ninja" ] ||
  die "$build is not configured; run scripts/build-qemu.sh (make build)"
export PATH=$VMSNAP_CACHE/venv/bin:$PATH
export CCACHE_DIR=${CCACHE_DIR:-$VMSNAP_CACHE/ccache}
export CCACHE_BASEDIR=$tree CCACHE_NOHASHDIR=1
note "building tests/qtest/migration-test in $build"
ninja -C "$build" qemu-system-x86_64 tests/qtest/migration-test

# The machines' default NICs (e1000e on q35, e1000 on pc) need iPXE's
# ROMs, from ipxe-qemu, which build-qemu.sh links with the other firmware.
data=$build/qemu-bundle/usr/local/share/qemu
for f in bios-256k.bin efi-e1000e.rom efi-e1000.rom; do
  [ -e "$data/$f" ] || die "$data/$f is missing; run scripts/build-qemu.sh
(it links the firmware of Debian's seabios and ipxe-qemu)"
done

specs=()
for t in "$@"; do
  machine=q35
  case $t in pc:* | q35:*) machine=${t%%:*} t=${t#*:} ;; esac
  t=${t#/}
  t=${t#x86_64/migration/}
  specs+=("$machine:/x86_64/migration/$t")
done

unshare=(unshare -m)
[ "$(id -u)" = 0 ] || unshare=(unshare -r -m)
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
touch "$log/results"
# Each test's output stays here, for a look after the run.
logs=$VMSNAP_CACHE/check-migration
rm -rf "$logs"
mkdir -p "$logs"
note "migration-test --full, at most ${total_timeout}s; logs in $logs"
start=$SECONDS
rc=0
timeout -k 10 "$total_timeout" "${unshare[@]}" "$0" --in-namespace \
  "$log" "$logs" "${specs[@]}" || rc=$?
secs=$((SECONDS - start))
cp "$log/results" "$logs/results"

pass=$(grep -c ' pass ' "$log/results" || true)
skip=$(grep -c ' skip ' "$log/results" || true)
fail=$(grep -Ec ' (fail|timeout|missing) ' "$log/results" || true)
[ $rc -eq 0 ] ||
  note "the run ended with status $rc (124: the overall ${total_timeout}s timeout)"
grep -E ' (fail|timeout|missing|skip) ' "$log/results" | sed 's/^/  /' || true
printf 'check-migration: %d passed, %d failed, %d skipped, %dm%02ds\n' \
  "$pass" "$fail" "$skip" $((secs / 60)) $((secs % 60))
[ "$rc" -eq 0 ] && [ "$fail" -eq 0 ]
