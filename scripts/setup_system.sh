#!/usr/bin/env bash
# System packages facexplain needs: Python 3.11+ with venv, npm (to fetch the face-api weights) and
# chromium (the audit test renders the HTML report headless).
# Installs what is missing with apt-get when running as root; otherwise says what to install.
# With --podman (or FACEXPLAIN_WITH_PODMAN=1) also podman, buildah, runc and debootstrap, which only
# `make images` needs, and a containers.conf drop-in that makes podman 4.3 run containers on machines
# like these (see podman_config below).
# With --torchserve (or FACEXPLAIN_WITH_TORCHSERVE=1) also Java 17 (openjdk-17-jre-headless) when `java` is
# missing: TorchServe's frontend is a Java program (`make setup-torchserve`, `make torchserve`).
set -euo pipefail
with_podman=${FACEXPLAIN_WITH_PODMAN:-0}
with_torchserve=${FACEXPLAIN_WITH_TORCHSERVE:-0}
for arg in "$@"; do
  case "$arg" in
    --podman) with_podman=1 ;;
    --torchserve) with_torchserve=1 ;;
    *) echo "unknown option $arg (expected --podman, --torchserve)" >&2; exit 2 ;;
  esac
done
need=()
python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || need+=(python3 python3-venv)
command -v npm >/dev/null || need+=(npm)
command -v chromium >/dev/null || need+=(chromium)  # renders the audit report in the end-to-end test
if [ "$with_torchserve" = 1 ]; then
  command -v java >/dev/null || need+=(openjdk-17-jre-headless)
fi
if [ "$with_podman" = 1 ]; then
  for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
fi

# podman 4.3 (Debian bookworm) as measured on these machines: crun fails on a hybrid cgroup v1/v2 layout
# (runc works), a container's default ulimits above the machine's hard limits make every start fail, and
# without systemd as PID 1 neither the systemd cgroup manager nor journald events work.
# (podman's own defaults, nofile 1048576 and nproc 4194304, are above these machines' hard limits.) The drop-in
# applies to every podman call of root; an existing one is left alone (delete it to regenerate).
podman_config() {
  local conf=/etc/containers/containers.conf.d/50-facexplain.conf nofile nproc manager=cgroupfs events=file
  [ -e "$conf" ] && return 0
  [ "$(id -u)" -eq 0 ] || { echo "podman: run as root to write $conf" >&2; return 0; }
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  # runc failed to set nproc above 32768 here although the hard limit read 96367: stay at or below both.
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then manager=systemd; events=journald; fi
  mkdir -p "$(dirname "$conf")"
  printf '%s\n' \
    "# Written by facexplain's scripts/setup_system.sh --podman (see the comment there)." \
    "[containers]" \
    "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]" \
    "" \
    "[engine]" \
    "runtime = \"runc\"" \
    "cgroup_manager = \"$manager\"" \
    "events_logger = \"$events\"" >"$conf"
  echo "podman settings written to $conf" >&2
}

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing system packages: ${need[*]} (install them, e.g. sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
if [ "$with_podman" = 1 ]; then podman_config; fi
