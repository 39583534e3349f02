#!/usr/bin/env bash
# Install what building and testing needs on a Debian 12/13 host:
# Debian packages (apt verifies their checksums against the signed
# archive) and a Python venv whose packages are pinned by version and
# sha256 in python/requirements.txt.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"

APT_PACKAGES=(
  # build QEMU
  gcc g++ make pkgconf git ccache flex bison python3-venv
  libglib2.0-dev libpixman-1-dev zlib1g-dev device-tree-compiler
  # optional block features that iotests exercise (zstd clusters, FUSE
  # exports), as a distribution's QEMU has them
  libzstd-dev libfuse3-dev fuse3
  # firmware the x86 machine needs at run time (the +ds tarball has none)
  seabios qemu-system-data ipxe-qemu
  # build the test guest and run tests
  curl xz-utils cpio kmod e2fsprogs btrfs-progs xfsprogs perl
  # qemu-guest-agent's run-time libraries, copied into the guest
  libglib2.0-0 libnuma1 libudev1 liburing2
  # uuidgen for scripts/ceph-cluster.sh; Ceph itself is added below
  uuid-runtime
  # the distribution's own qemu-img, which must find our images clean
  qemu-utils
)

sudo=
[ "$(id -u)" = 0 ] || sudo=sudo

# Ceph (CEPH_PACKAGES in pins.sh) at the version pinned for this release:
# NAME=VERSION, which apt installs (or changes to) exactly.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = "$CEPH_DEBIAN_CODENAME" ]; then
  APT_PACKAGES+=("${CEPH_PACKAGES[@]/%/=$CEPH_DEBIAN_VERSION}")
else
  note "no Ceph version pinned for Debian '$codename' (pins.sh): using its own"
  APT_PACKAGES+=("${CEPH_PACKAGES[@]}")
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  name=${p%%=*}
  st=$(dpkg-query -W -f='${Status} ${Version}' "$name" 2>/dev/null) || st=
  if [ "$name" = "$p" ]; then
    [[ $st == "install ok installed "* ]] || missing+=("$p")
  else    # NAME=VERSION: that version
    [ "$st" = "install ok installed ${p#*=}" ] || missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  note "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
    --no-install-recommends "${missing[@]}" ||
    die "apt-get install failed; if a pinned version (pins.sh) is no longer in
the archive, pin the one it has: apt-cache policy ${missing[*]%%=*}"
fi

venv=$VMSNAP_CACHE/venv
stamp=$venv/.requirements.sha256
want=$(sha256sum "$here/python/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python3" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  note "creating Python venv in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    --require-hashes -r "$here/python/requirements.txt"

  echo "$want" > "$stamp"
fi

# The vmsnap package itself (python/), for the "vmsnap" command; again
# whenever its sources change.  Its only dependency, qemu.qmp, is pinned
# above, and setuptools from the venv builds it, so nothing is fetched.
pkg_stamp=$venv/.vmsnap.sha256
pkg_want=$(cat "$here/python/pyproject.toml" "$here"/python/vmsnap/*.py |
           sha256sum | cut -d' ' -f1)
if [ "$(cat "$pkg_stamp" 2>/dev/null)" != "$pkg_want" ]; then
  note "installing the vmsnap command into $venv"
  rm -rf "$here/python/build" "$here"/python/*.egg-info
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    --no-build-isolation --no-index "$here/python"
  rm -rf "$here/python/build" "$here"/python/*.egg-info
  echo "$pkg_want" > "$pkg_stamp"
fi
