#!/usr/bin/env bash
# Build facexplain's container images with podman, with nothing pulled from an image registry:
#
#   scripts/build_images.sh [cpu] [cuda] [mlflow] [postgres]  (default: cpu mlflow postgres; `make images`)
#
#   facexplain/debian-base:bookworm    Debian bookworm from the archive (debootstrap --variant=minbase, imported)
#   facexplain/service:<version>       the services, CLI and pipelines, CPU torch      (k8s/images/service.Containerfile)
#   facexplain/service:<version>-cuda  the same with PyPI's CUDA torch (needs PyPI)    (same file, FLAVOUR=cuda)
#   facexplain/mlflow:<version>        MLflow server + PostgreSQL driver               (k8s/images/mlflow.Containerfile)
#   facexplain/postgres:<version>      Debian's PostgreSQL for staging without a registry (k8s/images/postgres.Containerfile)
#
# <version> is the project version in pyproject.toml; no image is ever tagged `latest`.
# Inputs gathered here into var/images/ (not committed): the wheels of requirements.lock and
# k8s/images/mlflow.lock (pip wheel through the host's pip configuration, which is what finds the local CPU
# torch wheel; failing that, PyTorch's CPU index), and the face-api tarball (npm pack, sha256 pinned in
# scripts/fetch_weights.sh). Builds run under `nice` (FACEXPLAIN_BUILD_NICE, default 15) so a training
# run keeps its CPU. Figures (build seconds, sizes) go to var/images/build-report.txt.
#
# Settings: FACEXPLAIN_DEBIAN_MIRROR (default: the Debian mirror this machine's apt uses),
# FACEXPLAIN_REBUILD_BASE=1 (bootstrap the base again), FACEXPLAIN_TORCH_INDEX_URL (CUDA flavour's torch
# index, default PyPI), FACEXPLAIN_KEEP_BUILD_CACHE=1 (keep the builder stages' layers).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v podman >/dev/null || {
  echo "podman is not installed: run \`make setup-podman\` (Debian packages podman buildah runc debootstrap)" >&2
  exit 1
}

TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(cpu mlflow postgres)
for t in "${TARGETS[@]}"; do
  case "$t" in cpu | cuda | mlflow | postgres) ;; *) echo "unknown image '$t' (cpu, cuda, mlflow, postgres)" >&2; exit 2 ;; esac
done

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
OUT=var/images
WHEELS=$OUT/wheels
REPORT=$OUT/build-report.txt
NICE=(nice -n "${FACEXPLAIN_BUILD_NICE:-15}")
ROOTFS_IMAGE=localhost/facexplain/debian-rootfs:bookworm
BASE_IMAGE=localhost/facexplain/debian-base:bookworm
FACEAPI_VERSION=$(sed -n 's/^VERSION=//p' scripts/fetch_weights.sh)
FACEAPI_SHA256=$(sed -n 's/^SHA256=//p' scripts/fetch_weights.sh)
FACEAPI_TGZ=$OUT/vladmandic-face-api-$FACEAPI_VERSION.tgz
mkdir -p "$OUT"

log() { printf '[images] %s\n' "$*" >&2; }
record() { printf '%s\n' "$*" | tee -a "$REPORT" >&2; }
size_mb() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1e6}'; }

# The Debian mirror apt uses here (deb822 .sources or one-line sources.list), unless told otherwise.
debian_mirror() {
  if [ -n "${FACEXPLAIN_DEBIAN_MIRROR:-}" ]; then echo "$FACEXPLAIN_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
    /^URIs:/ {u = $2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == "bookworm" && u != "") {print u; exit}}')
  [ -n "$uri" ] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}')
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  if podman image exists "$BASE_IMAGE" && [ -z "${FACEXPLAIN_REBUILD_BASE:-}" ]; then
    log "$BASE_IMAGE exists (FACEXPLAIN_REBUILD_BASE=1 rebuilds it)"
    return
  fi
  command -v debootstrap >/dev/null || { echo "debootstrap is not installed: make setup-podman" >&2; exit 1; }
  local mirror security rootfs start
  mirror=$(debian_mirror)
  security=${FACEXPLAIN_DEBIAN_SECURITY_MIRROR:-${mirror%/debian}/debian-security}
  rootfs=$OUT/rootfs
  start=$SECONDS
  if ! podman image exists "$ROOTFS_IMAGE" || [ -n "${FACEXPLAIN_REBUILD_BASE:-}" ]; then
    # A mirror caught mid-update once failed the Release signature check here: one more try.
    local attempt
    for attempt in 1 2; do
      log "debootstrap --variant=minbase bookworm from $mirror (try $attempt)"
      rm -rf "$rootfs"
      if "${NICE[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$OUT/debootstrap.log" 2>&1; then
        break
      fi
      tail -5 "$OUT/debootstrap.log" >&2
      [ "$attempt" = 2 ] && exit 1
      sleep 20
    done
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$rootfs" -c . | podman import --quiet - "$ROOTFS_IMAGE" >/dev/null
    rm -rf "$rootfs"
  fi
  "${NICE[@]}" podman build --network=host --layers=false -f k8s/images/base.Containerfile \
    --build-arg ROOTFS_IMAGE="$ROOTFS_IMAGE" --build-arg DEBIAN_MIRROR="$mirror" \
    --build-arg DEBIAN_SECURITY_MIRROR="$security" -t "$BASE_IMAGE" k8s/images
  record "$BASE_IMAGE: $((SECONDS - start)) s, $(size_mb "$BASE_IMAGE") MB"
}

# Wheels for both locks, re-gathered when a lock changes. torch must be the CPU build for the CPU image:
# the host's pip configuration finds the local wheel on these machines; elsewhere PyTorch's CPU index has it.
gather_wheels() {
  local stamp=$WHEELS/.locks.sha256 want
  want=$(cat requirements.lock k8s/images/mlflow.lock | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  local pip=("$PY" -m pip) torch_pin start=$SECONDS
  torch_pin=$(grep '^torch==' requirements.lock)
  mkdir -p "$WHEELS"
  log "gathering wheels into $WHEELS"
  ls "$WHEELS"/torch-"${torch_pin#torch==}"+cpu-*.whl >/dev/null 2>&1 ||
    "${NICE[@]}" "${pip[@]}" wheel -q --no-deps -w "$WHEELS" "$torch_pin"
  if ! ls "$WHEELS"/torch-"${torch_pin#torch==}"+cpu-*.whl >/dev/null 2>&1; then
    log "pip found no CPU build of $torch_pin here; using https://download.pytorch.org/whl/cpu"
    rm -f "$WHEELS"/torch-*.whl
    "${NICE[@]}" "${pip[@]}" wheel -q --no-deps -w "$WHEELS" --index-url https://download.pytorch.org/whl/cpu "$torch_pin"
  fi
  # Only the pins without a wheel here yet go to the indexes (a full pass queries every index page: minutes).
  "$PY" - "$WHEELS" requirements.lock k8s/images/mlflow.lock >"$OUT/missing-wheels.txt" <<'PYEOF'
import re, sys
from pathlib import Path
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
have = {tuple(norm(p) for p in w.name.split("-")[:2]) for w in Path(sys.argv[1]).glob("*.whl")}
pins = {line.strip() for f in sys.argv[2:] for line in open(f) if "==" in line and not line.startswith("#")}
for pin in sorted(pins):
    name, version = pin.split("==")
    if name != "torch" and (norm(name), norm(version)) not in have:
        print(pin)
PYEOF
  if [ -s "$OUT/missing-wheels.txt" ]; then
    "${NICE[@]}" "${pip[@]}" wheel -q --no-deps -w "$WHEELS" -r "$OUT/missing-wheels.txt"
  fi
  echo "$want" >"$stamp"
  record "wheels: $((SECONDS - start)) s, $(du -sm "$WHEELS" | cut -f1) MB"
}

gather_faceapi() {
  if [ ! -f "$FACEAPI_TGZ" ]; then
    command -v npm >/dev/null || { echo "npm is required to fetch the face-api weights" >&2; exit 1; }
    log "npm pack @vladmandic/face-api@$FACEAPI_VERSION"
    (cd "$OUT" && npm pack --silent "@vladmandic/face-api@$FACEAPI_VERSION" >/dev/null)
  fi
  echo "$FACEAPI_SHA256  $FACEAPI_TGZ" | sha256sum --quiet --strict -c - ||
    { echo "checksum mismatch for $FACEAPI_TGZ (delete it to fetch it again)" >&2; exit 1; }
}

build() {  # build <name> <tag> <Containerfile> [podman build args...]
  local name=$1 tag=$2 file=$3 start=$SECONDS
  shift 3
  log "building $tag ($file)"
  "${NICE[@]}" podman build --network=host --ignorefile k8s/images/containerignore -f "$file" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VERSION="$VERSION" -t "$tag" "$@" .
  record "$tag ($name): $((SECONDS - start)) s, $(size_mb "$tag") MB"
}

# Which sources the service image holds (cli/podman_staging.py: staging refuses an image built from others).
SOURCE_DIGEST=$("$PY" -c 'from cli.podman_staging import source_digest; print(source_digest())')
: >>"$REPORT"
record "# $(date -u +%FT%TZ) scripts/build_images.sh ${TARGETS[*]} (podman $(podman version --format '{{.Client.Version}}'))"
build_base
case " ${TARGETS[*]} " in  # the PostgreSQL image needs neither wheels nor weights
  *" cpu "* | *" cuda "* | *" mlflow "*) gather_wheels; gather_faceapi ;;
esac
for t in "${TARGETS[@]}"; do
  case "$t" in
    cpu)
      build cpu "localhost/facexplain/service:$VERSION" k8s/images/service.Containerfile \
        --label "io.facexplain.source-digest=$SOURCE_DIGEST" --build-arg FLAVOUR=cpu --build-arg FACEAPI_VERSION="$FACEAPI_VERSION" --build-arg FACEAPI_SHA256="$FACEAPI_SHA256"
      ;;
    cuda)
      ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
      build cuda "localhost/facexplain/service:$VERSION-cuda" k8s/images/service.Containerfile \
        --label "io.facexplain.source-digest=$SOURCE_DIGEST" --build-arg FLAVOUR=cuda --build-arg FACEAPI_VERSION="$FACEAPI_VERSION" --build-arg FACEAPI_SHA256="$FACEAPI_SHA256" \
        --build-arg TORCH_INDEX_URL="${FACEXPLAIN_TORCH_INDEX_URL:-https://pypi.org/simple}" --secret id=pip-ca,src="$ca"
      ;;
    mlflow)
      build mlflow "localhost/facexplain/mlflow:$VERSION" k8s/images/mlflow.Containerfile
      ;;
    postgres)  # its own small context: the Containerfile and the entry point, nothing of the project
      start=$SECONDS
      log "building localhost/facexplain/postgres:$VERSION (k8s/images/postgres.Containerfile)"
      "${NICE[@]}" podman build --network=host -f k8s/images/postgres.Containerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg VERSION="$VERSION" -t "localhost/facexplain/postgres:$VERSION" k8s/images
      record "localhost/facexplain/postgres:$VERSION (postgres): $((SECONDS - start)) s, $(size_mb "localhost/facexplain/postgres:$VERSION") MB"
      ;;
  esac
done
# Builder stages leave untagged images behind: gigabytes of wheels and venvs nobody runs.
[ -n "${FACEXPLAIN_KEEP_BUILD_CACHE:-}" ] || podman image prune -f >/dev/null
podman images --filter reference='localhost/facexplain/*' --format '{{.Repository}}:{{.Tag}}  {{.Size}}' >&2
