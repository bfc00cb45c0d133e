#!/usr/bin/env bash
# Fill .devcarry/ (git-ignored) with what bench/gpu_suite.py needs on a lent GPU machine and its image lacks
# (DESIGN.md §6): the diffusers wheel (pure Python; its dependencies are on the image) and the headers of
# nlohmann-json3-dev and libssl-dev (+ libssl3's libcrypto for linking), unpacked from Debian packages.
# Also .devcarry/commit.txt: the commit the tree was copied from (the device's copy has no .git).
# About 15 MiB; the device tool carries at most 64 MiB with the tree. Run on this (CPU) machine before the
# device calls; BENCHMARKS.md ("GPU suite") gives the phase commands to issue then.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.devcarry
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
mkdir -p "$CARRY/wheels" "$CARRY/deb" "$CARRY/debs"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d "$CARRY/wheels" "diffusers==$DIFFUSERS_VERSION"
(cd "$CARRY/debs" && apt-get download nlohmann-json3-dev libssl-dev libssl3 >/dev/null)
for deb in "$CARRY"/debs/*.deb; do dpkg -x "$deb" "$CARRY/deb"; done
rm -rf "$CARRY/debs" "$CARRY/deb/usr/share/doc" "$CARRY/deb/usr/share/man"
find "$CARRY/deb" -name '*.a' -delete  # static libraries: not needed, most of the size
rm -rf "$CARRY/site"  # gpu_suite.py installs the wheels into it on the device
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit+uncommitted"
echo "$commit" > "$CARRY/commit.txt"
du -sh "$CARRY"
