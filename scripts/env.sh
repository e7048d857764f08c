# shellcheck shell=bash
# Source this to point gymtrl's configs at the venvs built by scripts/setup_venvs.sh:
#   source scripts/env.sh     (builds the venvs first if needed)
_gymtrl_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_gymtrl_venvs=$(bash "$_gymtrl_root/scripts/setup_venvs.sh") || return 1
GYMTRL_TRAINER_VENV=$(echo "$_gymtrl_venvs" | sed -n 's/^trainer=//p')
GYMTRL_VLLM_VENV=$(echo "$_gymtrl_venvs" | sed -n 's/^vllm=//p')
GYMTRL_GYM_VENV=$(echo "$_gymtrl_venvs" | sed -n 's/^gym=//p')
export GYMTRL_VLLM_VENV GYMTRL_GYM_VENV
# `|| true`: as when this was one `export X=$(...)`, a failure leaves it empty without ending a
# caller that runs under `set -e` (scripts/test.sh, scripts/quickstart.sh).
GYMTRL_GYM_SITE=$("$GYMTRL_GYM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
export GYMTRL_GYM_SITE
export GYMTRL_TRAINER_VENV
export PATH="$GYMTRL_TRAINER_VENV/bin:$PATH"
unset _gymtrl_root _gymtrl_venvs
