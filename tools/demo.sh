#!/usr/bin/env bash
# Set up (if needed) and run the demo migration: a 1 GiB guest over loopback, digest-checked.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup.sh"
exec "$root/.venv/bin/mignet" demo "$@"
