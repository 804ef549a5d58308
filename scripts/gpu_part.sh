#!/usr/bin/env bash
# On the GPU machine: append part N of the split wheel to DEST/NAME.partial after checking the
# part's sha256; the last part also checks the whole file's and renames it to DEST/NAME.
# Parts go in order, 0 first (which starts the file afresh), one device call each, back to back
# (docs/gpu.md). Part 0 always starts afresh; re-running a later part already appended is a no-op.
#
#   scripts/gpu_part.sh N [PARTS]      # PARTS: the carried folder with MANIFEST (.gpu/parts)
#
# Env: DEST (/tmp/gpu-wheels), outside the repository: the machine keeps it between calls while
# it stays warm; a fresh machine has none, and then part N > 0 says to start again at 0.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 N [PARTS]" >&2; exit 2; }
N=$1
PARTS=${2:-.gpu/parts}
DEST=${DEST:-/tmp/gpu-wheels}
die() { echo "gpu_part: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

[ -f "$PARTS/MANIFEST" ] || die "$PARTS/MANIFEST missing (carry it with the part)"
read -r NAME SIZE SHA < <(awk '$1 == "file" {print $2, $3, $4}' "$PARTS/MANIFEST")
line=$(awk -v n="$N" '$1 == "part" && $2 == n' "$PARTS/MANIFEST")
[ -n "$line" ] || die "no part $N in $PARTS/MANIFEST"
read -r _ _ OFFSET PSIZE PSHA PFILE <<< "$line"
[ -f "$PARTS/$PFILE" ] || die "$PARTS/$PFILE missing (carry it)"
[ "$(sha "$PARTS/$PFILE")" = "$PSHA" ] || die "$PFILE: sha256 differs from the MANIFEST's"

mkdir -p "$DEST"
WHOLE=$DEST/$NAME
PARTIAL=$WHOLE.partial
if [ -f "$WHOLE" ] && [ "$(sha "$WHOLE")" = "$SHA" ]; then
  echo "gpu_part: $WHOLE already complete"
  exit 0
fi
[ "$N" -eq 0 ] && : > "$PARTIAL"
have=$(stat -c %s "$PARTIAL" 2>/dev/null || echo none)
end=$(( OFFSET + PSIZE ))
if [ "$have" = "$end" ] && [ "$(tail -c "$PSIZE" "$PARTIAL" | sha256sum | cut -d' ' -f1)" = "$PSHA" ]; then
  echo "gpu_part: part $N already appended"
elif [ "$have" = "$OFFSET" ]; then
  cat "$PARTS/$PFILE" >> "$PARTIAL"
  echo "gpu_part: part $N appended ($PSIZE bytes at $OFFSET of $SIZE)"
else
  die "$PARTIAL holds ${have} bytes, part $N starts at $OFFSET: a fresh machine or a part skipped; start again at part 0"
fi

if [ "$end" -eq "$SIZE" ]; then
  [ "$(sha "$PARTIAL")" = "$SHA" ] || die "$NAME reassembled, but its sha256 differs from the MANIFEST's; start again at part 0"
  mv "$PARTIAL" "$WHOLE"
  echo "gpu_part: $WHOLE complete, sha256 $SHA"
fi
