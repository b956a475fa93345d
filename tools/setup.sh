#!/usr/bin/env bash
# One-step set-up on a fresh Debian 12 machine (run as root): Debian packages, the venv,
# mignet with its test extras, and the soft-RoCE guest's prerequisites. Idempotent and fast
# when everything is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf 'setup: %s\n' "$*" >&2; }

python="${MIGNET_PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c 'import mignet, pytest, pytest_timeout, hypothesis, atheris, xxhash, blake3, qemu.qmp, matplotlib, mypy, ruff' 2>/dev/null \
        || ! .venv/bin/mignet --version >/dev/null 2>&1; then
    log "installing mignet and its test extras into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e ".[test,bench]"
fi
# QEMU (a real migration peer) and the soft-RoCE guest's kernel, rdma-core and pyverbs.
if [[ $(id -u) -eq 0 ]]; then
    bash tools/rxe/setup.sh "$root/.venv"
else
    log "not root: skipping Debian packages (QEMU peer and RDMA tests will be skipped)"
fi
