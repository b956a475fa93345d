#!/usr/bin/env bash
# Install what the soft-RoCE (rdma_rxe) test harness needs, idempotently.
#
# Why: the host kernel has no RDMA support, so RDMA tests run in a small guest booted
# (under TCG) from Debian's linux-image-amd64, which ships rdma_rxe.ko. virtme-ng boots
# that kernel with the host's root shared read-only, so the guest sees this checkout and
# its venv. Debian's python3-pyverbs (matching the system libibverbs) is exposed to the
# venv through a directory that holds only a symlink to the pyverbs package.
#
# Usage (as root, Debian 12):  tools/rxe/setup.sh [VENV]
#   VENV defaults to the repository's .venv (computed relative to this script).
# Fast when everything is already there: it asks dpkg-query / pip before installing.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"
venv="${1:-${repo_root}/.venv}"

apt_packages=(
    qemu-system-x86      # the emulator virtme-ng drives (TCG; KVM cannot run Linux guests here)
    linux-image-amd64    # a kernel that ships drivers/infiniband/sw/rxe/rdma_rxe.ko
    rdma-core            # rdma tool (iproute2's `rdma`), udev rules, libs
    ibverbs-providers    # librxe provider for libibverbs
    ibverbs-utils        # ibv_devices, ibv_devinfo
    rdmacm-utils         # rping, ucmatose (sanity checks)
    perftest             # ib_write_bw and friends
    python3-pyverbs      # pyverbs built against the system libibverbs (CPython 3.11)
    iproute2             # ip, rdma
    kmod                 # modprobe inside the guest
    busybox-static       # virtme-ng's fallback init helpers
    udev                 # udevd: creates /dev/infiniband/* nodes in the guest
)

log() { printf 'rxe-setup: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get install)"; exit 1
fi

# ---- Debian packages -------------------------------------------------------------
missing=()
for pkg in "${apt_packages[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "${pkg}" 2>/dev/null || true)"
    [[ "${status}" == "installed" ]] || missing+=("${pkg}")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Update the lists only when an install from the current lists fails (or none exist).
    if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
else
    log "Debian packages already installed"
fi

# ---- virtme-ng in the venv ---------------------------------------------------------
if [[ ! -x "${venv}/bin/python" ]]; then
    log "no venv at ${venv}: create it first (python3.11 -m venv ${venv})"; exit 1
fi
if "${venv}/bin/python" -m pip show -q virtme-ng >/dev/null 2>&1; then
    log "virtme-ng already in ${venv}"
else
    log "installing virtme-ng into ${venv}"
    "${venv}/bin/python" -m pip install -q virtme-ng
fi

# ---- expose Debian's pyverbs (only that package) to the venv -----------------------
pyverbs_src=/usr/lib/python3/dist-packages/pyverbs
link_dir="${venv}/rxe-pyverbs"
site="$("${venv}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "${link_dir}"
if [[ "$(readlink "${link_dir}/pyverbs" 2>/dev/null || true)" != "${pyverbs_src}" ]]; then
    rm -f "${link_dir}/pyverbs"
    ln -s "${pyverbs_src}" "${link_dir}/pyverbs"
fi
pth="${site}/debian-pyverbs.pth"
if [[ "$(cat "${pth}" 2>/dev/null || true)" != "${link_dir}" ]]; then
    printf '%s\n' "${link_dir}" > "${pth}"
fi

if ! "${venv}/bin/python" -c 'import pyverbs.device' 2>/dev/null; then
    log "warning: 'import pyverbs.device' fails in ${venv}"; exit 1
fi
log "ok: $(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n1), pyverbs from ${pyverbs_src}"
