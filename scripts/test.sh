#!/usr/bin/env bash
# The test command, from a fresh machine: build (or reuse) the three venvs, then run pytest in the
# trainer venv. Integration tests start one real vLLM CPU server and one set of NeMo Gym servers
# per session; the quickstart test runs scripts/quickstart.sh itself.
#   bash scripts/test.sh [pytest args]       e.g. -m "not servers" for the fast tests only
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m pytest "${@:-tests}"
