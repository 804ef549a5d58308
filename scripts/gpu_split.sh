#!/usr/bin/env bash
# Split FILE into numbered parts small enough for the device tool (64 MiB a call, the working
# tree included), with a MANIFEST of sizes, offsets and sha256; scripts/gpu_part.sh puts them
# back together on the other side (docs/gpu.md).
#
#   scripts/gpu_split.sh FILE DIR      # DIR/NAME.part000, ... and DIR/MANIFEST
#
# Env: PART_MIB (56: leaves room for the working tree in the same call), or PART_BYTES.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 FILE DIR" >&2; exit 2; }
FILE=$1
DIR=$2
PART_BYTES=${PART_BYTES:-$(( ${PART_MIB:-56} * 1024 * 1024 ))}
NAME=$(basename "$FILE")
mkdir -p "$DIR"
rm -f "$DIR/$NAME".part[0-9][0-9][0-9] "$DIR/MANIFEST"
split -b "$PART_BYTES" -d -a 3 "$FILE" "$DIR/$NAME.part"

size=$(stat -c %s "$FILE")
{
  echo "# file NAME SIZE SHA256, then per part: part INDEX OFFSET SIZE SHA256 FILE"
  echo "file $NAME $size $(sha256sum "$FILE" | cut -d' ' -f1)"
  offset=0
  index=0
  for part in "$DIR/$NAME".part[0-9][0-9][0-9]; do
    psize=$(stat -c %s "$part")
    echo "part $index $offset $psize $(sha256sum "$part" | cut -d' ' -f1) $(basename "$part")"
    offset=$(( offset + psize ))
    index=$(( index + 1 ))
  done
} > "$DIR/MANIFEST"
echo "gpu_split: $NAME ($size bytes) -> $(grep -c '^part ' "$DIR/MANIFEST") parts of at most $PART_BYTES bytes in $DIR"
