#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment outside the clone.
#
# The environment lives under ${SITN_CACHE_DIR:-~/.cache/sitn-stream}/venv-<hash of requirements.lock>,
# so every clone and every CI run with the same lock file reuses it instead of reinstalling the
# multi-GB PyTorch build. The pip/uv download cache sits beside it. Prints the venv path on stdout.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SITN_CACHE_DIR:-$HOME/.cache/sitn-stream}
python=${SITN_PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

lock_hash=$(cat "$repo/requirements.lock" | sha256sum | cut -c1-16)
venv="$cache/venv-$lock_hash"
export UV_CACHE_DIR="$cache/uv-cache" PIP_CACHE_DIR="$cache/pip-cache"
mkdir -p "$cache"
# One bootstrap at a time per cache (a test run and the main job started together share the venv).
exec 9>"$cache/bootstrap.lock"
flock 9

if [[ ! -f "$venv/.complete" ]]; then
  echo "bootstrap: creating $venv (first run installs PyTorch and Ray; this takes a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade "uv==0.13.9" >&2
  # Bytecode up front: a fresh venv otherwise compiles on first import in every Ray worker and agent,
  # which on a 2-core machine is slow enough to trip Ray's start-up timeouts.
  "$venv/bin/uv" pip install --compile-bytecode --python "$venv/bin/python" -r "$repo/requirements.lock" >&2
  touch "$venv/.complete"
fi
# The project itself: editable, so this clone's code is what runs. Cheap (no dependencies), and done
# only when the clone or its pyproject.toml changed: reinstalling rewrites bin/sitn, which a job
# started a moment earlier may be about to run.
project_stamp="$repo $(sha256sum < "$repo/pyproject.toml" | cut -c1-16)"
if [[ ! -f "$venv/.project" || $(cat "$venv/.project") != "$project_stamp" ]]; then
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps -e "$repo" >&2
  echo "$project_stamp" > "$venv/.project"
fi
echo "$venv"
