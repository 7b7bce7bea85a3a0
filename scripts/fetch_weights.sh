#!/usr/bin/env bash
# Install the default face models: npm pack @vladmandic/face-api@1.7.15 (MIT) and unpack its model/ folder.
set -euo pipefail
VERSION=1.7.15
SHA256=0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031
DEST=${FACEXPLAIN_FACEAPI_DIR:-.weights/face-api-$VERSION/model}
if [ -f "$DEST/face_recognition_model-weights_manifest.json" ]; then exit 0; fi
exec "$(dirname "$0")/npm_unpack.sh" "@vladmandic/face-api@$VERSION" "$SHA256" "$DEST" face-api model
