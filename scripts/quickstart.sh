#!/usr/bin/env bash
# The built-in default, from a fresh machine: build the three venvs (cached), build the tiny model,
# then train on configs/quickstart.yaml against real vLLM (CPU) and NeMo Gym servers.
#   bash scripts/quickstart.sh [key=value ...]     (overrides go to `gymtrl train`)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export GYMTRL_TINY_MODEL=${GYMTRL_TINY_MODEL:-runs/tiny-model}
python scripts/make_tiny_model.py "$GYMTRL_TINY_MODEL" \
  --corpus "$GYMTRL_GYM_SITE/resources_servers/workplace_assistant/data/example.jsonl" \
  --corpus "$GYMTRL_GYM_SITE/resources_servers/example_multi_step/data/example.jsonl"
exec gymtrl train --config configs/quickstart.yaml "$@"
