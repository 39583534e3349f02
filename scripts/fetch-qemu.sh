#!/usr/bin/env bash
# Populate qemu/ with pristine upstream QEMU $QEMU_VERSION as a local git
# repository (the release is its first commit) and apply patches/ on top
# with "git am".  Upstream git is used where it can be reached; otherwise
# Debian's source tarball of the same release, checked against its pinned
# sha256 and cached in $VMSNAP_CACHE.
#
# An existing qemu/ is left alone unless it has no commits beyond the
# pristine release; pass --force to rebuild it from scratch (this discards
# work in qemu/ that is not in patches/).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
cd "$here"

force=
[ "${1:-}" = --force ] && force=1

fetch_tarball() {
  local dest=$VMSNAP_CACHE/$QEMU_TARBALL
  mkdir -p "$VMSNAP_CACHE"
  if [ ! -f "$dest" ]; then
    note "downloading $QEMU_TARBALL_URL"
    curl -fsSL --retry 3 -o "$dest.part" "$QEMU_TARBALL_URL" || die \
"could not download $QEMU_TARBALL_URL.
Debian may have removed this pool file.  Put a copy of $QEMU_TARBALL
(sha256 $QEMU_TARBALL_SHA256) in $VMSNAP_CACHE/,
or make $QEMU_UPSTREAM_GIT reachable, then run this again."
    mv "$dest.part" "$dest"
  fi
  echo "$QEMU_TARBALL_SHA256  $dest" | sha256sum -c --quiet - || die \
    "$dest does not match the pinned sha256; delete it and run this again"
  echo "$dest"
}

populate() {
  rm -rf qemu.tmp
  if timeout 30 git ls-remote --exit-code "$QEMU_UPSTREAM_GIT" "refs/tags/$QEMU_UPSTREAM_TAG" \
       >/dev/null 2>&1; then
    note "cloning $QEMU_UPSTREAM_GIT at $QEMU_UPSTREAM_TAG"
    git clone -q --depth 1 --branch "$QEMU_UPSTREAM_TAG" \
      "$QEMU_UPSTREAM_GIT" qemu.tmp
  else
    local tarball
    tarball=$(fetch_tarball)
    note "unpacking $tarball"
    mkdir qemu.tmp
    tar -xJf "$tarball" -C qemu.tmp --strip-components=1
    git -C qemu.tmp init -q -b master
    git -C qemu.tmp add -A -f
    GIT_AUTHOR_DATE=2026-01-01T00:00:00Z GIT_COMMITTER_DATE=2026-01-01T00:00:00Z \
    git -C qemu.tmp -c user.name="${QEMU_PRISTINE_AUTHOR% <*}" \
      -c user.email="qemu-devel@nongnu.org" \
      commit -q -m "QEMU $QEMU_VERSION (Debian ${QEMU_TARBALL})"
  fi
  git -C qemu.tmp tag -f pristine >/dev/null
  rm -rf qemu
  mv qemu.tmp qemu
}

if [ -d qemu/.git ] && [ -z "$force" ]; then
  ours=$(git -C qemu rev-list --count pristine..HEAD 2>/dev/null || echo x)
  if [ "$ours" != 0 ]; then
    note "qemu/ already has $ours commits on the release; leaving it (use --force to reset)"
    exit 0
  fi
else
  populate
fi

shopt -s nullglob
series=()
for p in patches/[0-9][0-9][0-9][0-9]-*.patch; do
  case $p in patches/0000-*) ;; *) series+=("$here/$p") ;; esac
done
if [ ${#series[@]} -gt 0 ]; then
  note "applying ${#series[@]} patches"
  # Committer identity of the outer repository, so that regenerated
  # patches carry the same From: as the ones applied.
  # A fresh machine may have no git identity at all; git am needs one.
  git -C qemu -c user.name="$(git config user.name || echo vmsnap)" \
    -c user.email="$(git config user.email || echo vmsnap@localhost)" \
    am -q --keep-cr "${series[@]}" ||
    die "git am failed; see qemu/ (git -C qemu am --abort to undo)"
fi
