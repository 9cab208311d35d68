#!/usr/bin/env bash
# Install everything, then run the linter and the whole test suite (the README's test command; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
M3JEPA_BROWSER=1 bash scripts/setup.sh  # and Debian's chromium for the browser test of `m3jepa serve`
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m ruff check m3jepa tests bench scripts
python3 -m pytest -q -p no:cacheprovider --durations=30 "$@"  # the slowest tests named in every log
