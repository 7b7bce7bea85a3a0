#!/usr/bin/env bash
# Install a pinned lock file into the project's venv with uv (pinned, from PyPI), falling back to pip.
#
# Why uv: `pip install -r requirements.lock` spends most of a fresh set-up resolving and unpacking
# serially (110 s here on 2 cores, warm cache); uv installs and compiles the same pins in parallel
# (62 s warm), which is what keeps a fresh-clone `make demo` inside its 5 minutes. The pins are the
# same; only the installer differs, and pip is still used when uv cannot be installed or fails.
# Bytecode is compiled at install (`--compile-bytecode`), as pip does: without it every process of the
# first demo compiled torch's and MLflow's modules again (the demo's services started 60 s slower).
#
# uv does not read pip's configuration, so the indexes and wheel folders pip is configured with on
# this machine (pip.conf, PIP_* variables) are handed to uv explicitly. Every index is considered
# for every package (`unsafe-best-match`): that is pip's own rule, and each package is pinned
# exactly by the lock.
#
# usage: scripts/install_lock.sh VENV LOCK [extra uv/pip arguments ...]
set -euo pipefail
venv=$1 lock=$2; shift 2
UV_VERSION=0.13.10
py=$venv/bin/python
pip_get() { "$py" -m pip config get "$1" 2>/dev/null || true; }
if "$py" -m pip install -q "uv==$UV_VERSION" 2>/dev/null && [ -x "$venv/bin/uv" ]; then
  args=(--python "$py" -r "$lock" --index-strategy unsafe-best-match)
  for url in ${PIP_EXTRA_INDEX_URL:-} $(pip_get global.extra-index-url); do args+=(--extra-index-url "$url"); done
  for url in ${PIP_INDEX_URL:-} $(pip_get global.index-url); do args+=(--index-url "$url"); done
  for dir in ${PIP_FIND_LINKS:-} $(pip_get global.find-links); do args+=(--find-links "$dir"); done
  if "$venv/bin/uv" pip install -q --compile-bytecode "${args[@]}" "$@"; then exit 0; fi
  echo "uv could not install $lock; installing it with pip instead" >&2
fi
"$py" -m pip install -q -r "$lock" "$@"
