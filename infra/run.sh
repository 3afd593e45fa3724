#!/usr/bin/env bash
# The project's main job (README): set up the environment, then run `sitn` with the given arguments.
#
#   bash infra/run.sh                        # the default main job (see README)
#   bash infra/run.sh --exit-after-replay    # the main job with extra `sitn run` options
#   bash infra/run.sh eval --help            # any other sitn subcommand
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=$(bash infra/bootstrap.sh)
export PATH="$venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0
shared=${SITN_SHARED_DIR:-$repo/../shared}
if [[ $# -eq 0 || $1 == -* ]]; then
  set -- run --events "$shared/data/amazon_movie_book_c2dsr/events.csv" --source movie --target book "$@"
fi
exec sitn "$@"
