#!/usr/bin/env bash
# Set up (if needed) and run every test: the host suite, then the RDMA suite inside one
# soft-RoCE guest (real rdma_rxe), where the guest can boot; ruff and mypy first. Fails if
# any part fails, if a part ran no test at all, or if a process started by this run (QEMU,
# virtme-run, mignet serve/recv, ...) is still alive after its part.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup.sh || exit 1
py=.venv/bin/python

# Every process this run starts inherits this marker: after each part, none may be left.
export MIGNET_TEST_RUN="test-sh-$$-$(date +%s%N)"
left=0
check_left() {  # $1: what ran
    $py tests/support/processes.py --env "MIGNET_TEST_RUN=$MIGNET_TEST_RUN" --what "$1" || left=1
}

echo "== lint (ruff) and types (mypy) =="
lint=0
$py -m ruff check --no-cache mignet tests tools || lint=1
$py -m mypy --no-incremental || lint=1

echo "== host tests =="
# Bounded: a hung test fails (pytest-timeout, per test) and a hung run ends (timeout).
timeout -k 30 3000 $py -m pytest -q -m "not rdma" -p no:cacheprovider "$@"
host=$?
check_left "host tests"

rdma=0
if compgen -G "tests/rdma/test_*.py" >/dev/null; then
    reason="$($py -c 'import sys; sys.path.insert(0, "tools/rxe"); from run_in_guest import guest_available; print(guest_available() or "")')"
    if [[ -n "$reason" ]]; then
        echo "== RDMA tests: cannot boot the soft-RoCE guest: $reason =="
        rdma=1
    else
        echo "== RDMA tests (inside a soft-RoCE guest) =="
        # A writable 9p share inside the guest, for the test that --out refuses one.
        share="$(mktemp -d /tmp/mignet-9p.XXXXXX)"
        $py tools/rxe/run_in_guest.py --timeout 2700 --rwdir "$share" -- "$root/.venv/bin/python" -m pytest -q -m rdma \
            -p no:cacheprovider tests/rdma
        rdma=$?
        rm -rf "$share"
        check_left "RDMA guest run"
    fi
fi
echo "== lint/types exit $lint, host tests exit $host, RDMA tests exit $rdma, processes left $left =="
[[ $lint -eq 0 && $host -eq 0 && $rdma -eq 0 && $left -eq 0 ]]
