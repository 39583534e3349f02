#!/usr/bin/env bash
# Regenerate patches/ from the commits in qemu/ on top of the pristine
# release: one "git format-patch" file per commit plus the cover letter,
# whose text lives in patches/cover-letter.txt (subject on its first line,
# then a blank line, then the body).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"
cd "$here"
[ -d qemu/.git ] || die "qemu/ is not populated; run scripts/fetch-qemu.sh"
[ -z "$(git -C qemu status --porcelain --untracked-files=no)" ] ||
  die "qemu/ has uncommitted changes; commit them first"
n=$(git -C qemu rev-list --count pristine..HEAD)
[ "$n" -gt 0 ] || die "qemu/ has no commits on top of the pristine release"

cover=patches/cover-letter.txt
[ -f "$cover" ] || die "$cover is missing"
rm -f patches/[0-9][0-9][0-9][0-9]-*.patch
git -C qemu format-patch -q --cover-letter --no-signature --zero-commit \
  --subject-prefix='PATCH v3' -o "$here/patches" pristine..HEAD

# Fill in the cover letter's placeholders from cover-letter.txt.
python3 - "$here/patches"/0000-cover-letter.patch "$cover" <<'PY'
import sys
path, cover = sys.argv[1], sys.argv[2]
subject, _, body = open(cover).read().partition('\n\n')
text = open(path).read()
text = text.replace('*** SUBJECT HERE ***', subject.strip())
text = text.replace('*** BLURB HERE ***', body.strip())
open(path, 'w').write(text)
PY
# The date of the cover letter changes on every run; pin it to the date
# of the newest commit so that regenerating an unchanged series is a no-op.
date=$(git -C qemu log -1 --format=%aD HEAD)
sed -i "s/^Date: .*/Date: $date/" patches/0000-cover-letter.patch
ls patches/*.patch
