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
echo "== ruff"
ruff check .
echo "== mypy"
mypy learner stream serving sitn
echo "== pytest"
exec python -m pytest "$@"
