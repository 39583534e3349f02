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
check_qemu_gitlink

# apt-get source, by package name and version, from $QEMU_DEBIAN_SUITE.
# The host's own sources rarely list that suite, so a private apt
# configuration in $VMSNAP_CACHE/apt gets a deb-src entry with the same
# archive URI as the host's Debian entry and Debian's archive keyring;
# the host's apt configuration is not touched.
fetch_tarball() {
  local dest=$VMSNAP_CACHE/$QEMU_TARBALL
  local apt=$VMSNAP_CACHE/apt uri keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  mkdir -p "$VMSNAP_CACHE"
  if [ ! -f "$dest" ]; then
    uri=$(apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' \
            'Label: Debian' | sort -u | head -n 1)
    [ -n "$uri" ] || die "no Debian archive in this machine's apt sources;
add one (any suite) or put $QEMU_TARBALL (sha256 $QEMU_TARBALL_SHA256)
in $VMSNAP_CACHE/"
    [ -f "$keyring" ] || die "$keyring is missing; install debian-archive-keyring"
    mkdir -p "$apt/lists/partial" "$apt/cache" "$apt/dl"
    echo "deb-src [signed-by=$keyring] $uri $QEMU_DEBIAN_SUITE main" \
      > "$apt/sources.list"
    local opts=(-q -o Dir::Etc::SourceList="$apt/sources.list"
      -o Dir::Etc::SourceParts=/nonexistent -o Dir::State::Lists="$apt/lists"
      -o Dir::Cache="$apt/cache")
    [ "$(id -u)" = 0 ] && opts+=(-o APT::Sandbox::User=root)
    note "fetching qemu=$QEMU_DEBIAN_VERSION with apt-get source ($uri $QEMU_DEBIAN_SUITE)"
    apt-get "${opts[@]}" update >&2 || die "apt-get update of $uri $QEMU_DEBIAN_SUITE failed"
    (cd "$apt/dl" && apt-get "${opts[@]}" source --download-only \
       "qemu=$QEMU_DEBIAN_VERSION" >&2) || die \
"apt-get source qemu=$QEMU_DEBIAN_VERSION failed: Debian may have
dropped this version from $QEMU_DEBIAN_SUITE.  Put a copy of $QEMU_TARBALL
(sha256 $QEMU_TARBALL_SHA256) in $VMSNAP_CACHE/, or point
QEMU_DEBIAN_SUITE in scripts/pins.sh at a suite that still has it,
or make $QEMU_UPSTREAM_GIT reachable, then run this again."
    mv "$apt/dl/$QEMU_TARBALL" "$dest"
    rm -f "$apt"/dl/*
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
    note "base: upstream $QEMU_UPSTREAM_TAG ($(git -C qemu.tmp rev-parse HEAD)), not the" \
      "tarball commit the submodule pins; the sources are the same release"
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
    # Fixed author, committer, dates and message make the commit id
    # depend only on the tarball's contents; the gitlink pins it.
    local got
    got=$(git -C qemu.tmp rev-parse HEAD)
    [ "$got" = "$QEMU_PRISTINE_COMMIT" ] || die \
"the release commit made from $QEMU_TARBALL is $got, not
$QEMU_PRISTINE_COMMIT: the unpacked tree is not the pinned source.
If scripts/pins.sh changed the release on purpose, set
QEMU_PRISTINE_COMMIT there and update the gitlink with:
  git update-index --cacheinfo 160000,$got,qemu"
    note "release commit $got matches the qemu submodule pin"
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
