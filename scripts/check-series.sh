#!/usr/bin/env bash
# Check that every prefix of patches/ applies and builds (bisectability)
# and that the series is clean under QEMU's checkpatch.pl.  Each prefix is
# built in a scratch worktree of qemu/ with its own build directory; ccache
# keeps this to a few minutes per patch.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
venv=$VMSNAP_CACHE/venv
export PATH=$venv/bin:$PATH CCACHE_DIR=${CCACHE_DIR:-$VMSNAP_CACHE/ccache}
wt=$VMSNAP_CACHE/series-worktree
# The worktree always lives at the same place, so ccache can reuse it.
export CCACHE_BASEDIR=$wt CCACHE_NOHASHDIR=1
cd "$here"
check_qemu_gitlink

note "checkpatch.pl"
(cd qemu && ./scripts/checkpatch.pl --no-summary --terse \
   ../patches/[0-9][0-9][0-9][0-9]-*.patch | grep -v "^../patches/0000-") || true
errors=$(cd qemu && ./scripts/checkpatch.pl --no-summary --terse \
   ../patches/[0-9][0-9][0-9][0-9]-*.patch | grep -c ERROR || true)
[ "$errors" = 0 ] || die "checkpatch.pl found $errors errors"

git -C qemu worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"
git -C qemu worktree prune
git -C qemu worktree add -q --detach "$wt" pristine
trap 'git -C "$here/qemu" worktree remove --force "$wt" 2>/dev/null || true' EXIT
cp qemu/pc-bios/edk2-*.fd.bz2 "$wt/pc-bios/" 2>/dev/null || true
mkdir -p "$wt/build"
(cd "$wt/build" && ../configure --python="$venv/bin/python3" \
   --cc="ccache gcc" --cxx="ccache g++" "${QEMU_CONFIGURE_ARGS[@]}" >/dev/null)

for p in patches/[0-9][0-9][0-9][0-9]-*.patch; do
  case $p in patches/0000-*) continue ;; esac
  note "applying and building $(basename "$p")"
  git -C "$wt" -c user.name=check -c user.email=check@localhost \
    am -q --keep-cr "$here/$p" || die "$p does not apply"
  ninja -C "$wt/build" qemu-system-x86_64 qemu-img qemu-io qemu-nbd \
    >"$wt/build/ninja.log" 2>&1 || {
      tail -30 "$wt/build/ninja.log"; die "the series does not build at $p"; }
  # Not --enable-werror, whose different compiler flags would miss the
  # main build's ccache entries; ccache replays the warnings of cached
  # objects too, so this catches the same.
  if grep -qE ':[0-9]+:[0-9]+: warning:' "$wt/build/ninja.log"; then
    grep -E -B2 -A5 ':[0-9]+:[0-9]+: warning:' "$wt/build/ninja.log" | head -40
    die "the series has compiler warnings at $p"
  fi
done
note "every prefix of the series builds"
