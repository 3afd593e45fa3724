#!/usr/bin/env bash
# The project's test command (README). Installs what the tests need, then lint, types and pytest.
#
#   bash infra/test.sh [pytest args...]
#
# The virtual environment is created once under ~/.cache/sitn-stream (keyed by requirements.lock)
# and reused by every clone. Tests that need Kafka or Ray start them themselves.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=$(bash infra/bootstrap.sh)
export PATH="$venv/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0

echo "== kafka (fetch the broker from Maven Central into ~/.cache once)"
bash infra/kafka/fetch.sh >/dev/null || echo "test.sh: Kafka fetch failed; tests marked kafka will be skipped (see message above)" >&2
echo "== prometheus, chromium (Debian packages for the Prometheus scrape and dashboard browser tests)"
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium fonts-liberation)
if ((${#need[@]})); then
  # Root, or passwordless sudo; never a password prompt. Without recommends: prometheus would bring the
  # node exporter, chromium a desktop's worth (cups, avahi); fonts-liberation is the one that matters.
  if [[ $(id -u) -eq 0 ]]; then as_root=(); else as_root=(sudo -n); fi
  apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o=Dpkg::Use-Pty=0)
  if command -v apt-get >/dev/null && { [[ $(id -u) -eq 0 ]] || sudo -n true 2>/dev/null; }; then
    echo "test.sh: installing ${need[*]} with apt-get (once)" >&2
    # Try the package lists as they are first; refresh them only if that fails (a fresh image has none).
    "${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
      || { "${apt[@]}" update >/dev/null && "${apt[@]}" install --no-install-recommends "${need[@]}" >/dev/null; } \
      || echo "test.sh: apt-get install ${need[*]} failed; tests needing them will be skipped" >&2
  else
    echo "test.sh: ${need[*]} missing and apt-get is not usable (needs root or passwordless sudo); tests needing them will be skipped" >&2
  fi
fi
echo "== ruff"
ruff check .
echo "== mypy"
mypy learner stream serving sitn
echo "== pytest"
exec python -m pytest "$@"
