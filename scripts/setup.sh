#!/usr/bin/env bash
# Set up surgvqa on a fresh machine: system packages, a virtualenv in .venv with pinned dependencies.
# Safe to re-run: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng voices the questions, flite voices the unseen-engine check (required). ffmpeg decodes the m4a and webm
# that phones and browsers record (the demo's uploads; without it those are refused with a message saying so).
# chromium (Debian's, at /usr/bin/chromium) only runs the inspector's browser test (tests/test_browser.py;
# Playwright's own browser download cannot be relied on). The optional ones are installed when we can, otherwise
# their tests skip outside CI.
# Each package name is also the command it installs, which is how the check finds what is missing.
REQUIRED_PACKAGES=(espeak-ng flite)
OPTIONAL_PACKAGES=(ffmpeg chromium)
missing=()
for cmd in "${REQUIRED_PACKAGES[@]}" "${OPTIONAL_PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing system packages: ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    required_missing=()
    for cmd in "${REQUIRED_PACKAGES[@]}"; do
      command -v "$cmd" >/dev/null 2>&1 || required_missing+=("$cmd")
    done
    if [ ${#required_missing[@]} -gt 0 ]; then
      echo "[setup] missing system packages: ${required_missing[*]}" >&2
      echo "[setup] install them first, e.g.: sudo apt-get install ${required_missing[*]}  (macOS: brew install ${required_missing[*]})" >&2
      exit 1
    fi
    echo "[setup] ffmpeg or chromium may be missing: m4a/webm uploads are refused and their tests and the browser test skip (sudo apt-get install ffmpeg chromium)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "uv==0.13.10"
# torch first and pinned, by pip: an unpinned torch pulled in by another package would be a multi-GB CUDA build,
# and pip is what finds a CPU build a machine keeps on disk (its pip configuration says where).
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
# The rest by uv, which fetches and unpacks in parallel (about 9 s against pip's 64 s here, the same versions);
# pip where uv cannot reach the index (uv reads its own settings, not pip's).
if ! .venv/bin/uv pip install -q --python .venv/bin/python -e ".[test,wandb]"; then
  echo "[setup] uv could not install the dependencies; installing them with pip instead" >&2
  .venv/bin/python -m pip install -q --no-compile -e ".[test,wandb]"
fi
# Bytecode once, on every core, for all of it (pip compiles on one; without it, where PYTHONDONTWRITEBYTECODE is
# set, every process would compile what it imports). A file or two written for a newer Python than the
# venv's (torch ships one for 3.12) cannot compile and need not: they are never imported here.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages > /dev/null || true
# librosa compiles and caches its numba kernels when their modules are first imported: those that mixing in room
# noise runs (surgvqa.noise.load_noise_kernels), once, here, in one process (about 15 s, which synthesis no longer
# spends), so that processes started together later (synthesis workers, two notebooks) find the cache written and
# never write it at once, which leaves a mixed cache that crashes whoever loads it
.venv/bin/python -c "from surgvqa.noise import load_noise_kernels; load_noise_kernels()"
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
