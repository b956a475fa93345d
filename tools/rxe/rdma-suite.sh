#!/bin/sh
# Run the RDMA suite (pytest -m rdma, tests/rdma) and exit with its status: the test image's
# default command (Containerfile), usable on any machine set up like it.
#
#   MIGNET_RDMA_VIA=auto   (default) against this kernel's RDMA device when there is one
#                          (/sys/class/infiniband), else inside the soft-RoCE guest
#   MIGNET_RDMA_VIA=guest  always in the soft-RoCE guest (mignet/harness/rxe_guest.py): QEMU
#                          under TCG boots Debian's kernel, loads rdma_rxe, runs the suite
#   MIGNET_RDMA_VIA=host   always against this kernel's devices
#   MIGNET_RXE_TIMEOUT     the guest's limit in seconds, boot included (default 2100)
#
# Extra arguments go to pytest. The guest gets a writable 9p share (--rwdir), as in
# tools/test.sh, for the test that `recv --out` refuses one.
set -eu
cd "$(dirname "$0")/../.."
python="$(command -v python)"
via="${MIGNET_RDMA_VIA:-auto}"
if [ "$via" = auto ]; then
    if [ -n "$(ls -A /sys/class/infiniband 2>/dev/null)" ]; then via=host; else via=guest; fi
fi
case "$via" in
host)
    echo "rdma-suite: against this kernel's RDMA devices" >&2
    ibv_devices || true
    echo "rdma-suite: RLIMIT_MEMLOCK $(ulimit -l)" >&2
    exec "$python" -m pytest -q -m rdma -p no:cacheprovider tests/rdma "$@"
    ;;
guest)
    echo "rdma-suite: no RDMA device in this kernel ($(uname -r)): in the soft-RoCE guest (TCG)" >&2
    share="$(mktemp -d /tmp/mignet-9p.XXXXXX)"
    exec "$python" tools/rxe/run_in_guest.py --timeout "${MIGNET_RXE_TIMEOUT:-2100}" --rwdir "$share" -- \
        "$python" -m pytest -q -m rdma -p no:cacheprovider tests/rdma "$@"
    ;;
*)
    echo "rdma-suite: MIGNET_RDMA_VIA must be auto, guest or host (not '$via')" >&2
    exit 2
    ;;
esac
