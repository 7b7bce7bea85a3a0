#!/usr/bin/env bash
# Install the default face models: npm pack @vladmandic/face-api@1.7.15 (MIT) and unpack its model/ folder.
# The tarball's sha256 is pinned so a changed upstream artifact fails here, not in a test.
set -euo pipefail
VERSION=1.7.15
SHA256=0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031
DEST=${FACEXPLAIN_FACEAPI_DIR:-.weights/face-api-$VERSION/model}
if [ -f "$DEST/face_recognition_model-weights_manifest.json" ]; then exit 0; fi
command -v npm >/dev/null || { echo "npm is required to fetch the face-api weights (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "fetching @vladmandic/face-api@$VERSION from the npm registry"
(cd "$tmp" && npm pack --silent "@vladmandic/face-api@$VERSION" >/dev/null)
tgz="$tmp/vladmandic-face-api-$VERSION.tgz"
echo "$SHA256  $tgz" | sha256sum -c --quiet - || { echo "checksum mismatch for $tgz" >&2; exit 1; }
tar -xzf "$tgz" -C "$tmp" package/model package/LICENSE
mkdir -p "$DEST"
cp "$tmp"/package/model/* "$DEST"/
cp "$tmp"/package/LICENSE "$DEST"/LICENSE.face-api
echo "face-api weights installed in $DEST"
