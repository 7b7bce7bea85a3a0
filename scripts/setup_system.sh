#!/usr/bin/env bash
# System packages facexplain needs: Python 3.11+ with venv, npm (to fetch the face-api weights) and
# chromium (the audit test renders the HTML report headless).
# Installs what is missing with apt-get when running as root; otherwise says what to install.
set -euo pipefail
need=()
python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || need+=(python3 python3-venv)
command -v npm >/dev/null || need+=(npm)
command -v chromium >/dev/null || need+=(chromium)  # renders the audit report in the end-to-end test
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "missing system packages: ${need[*]} (install them, e.g. sudo apt-get install ${need[*]})" >&2
  exit 1
fi
