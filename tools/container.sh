#!/usr/bin/env bash
# Build the RDMA test image from Debian's packages alone and run the RDMA suite in it, the
# way a CI runner without RDMA would: inside the container the soft-RoCE guest harness boots
# Debian's kernel under QEMU/TCG (no /dev/kvm needed), loads rdma_rxe and runs
# `pytest -m rdma`. Exits with the suite's status. From a fresh Debian 12 host, as root:
#
#   tools/container.sh [--rebuild] [--build-only] [-- PYTEST-ARGS...]
#
#   1. installs podman, runc, catatonit and mmdebstrap if missing (apt);
#   2. makes the base image localhost/mignet-debian12-base with mmdebstrap (Debian 12
#      minbase) and `podman import`s it, unless it exists (--rebuild: make it again);
#   3. builds localhost/mignet-rdma from the Containerfile (layers cached by podman);
#   4. runs it with runc, explicit ulimits, no network, bounded by `timeout`
#      (MIGNET_CTR_TIMEOUT seconds, default 2400; the guest's own limit is 300 s less).
#
# Why runc and explicit ulimits: on these machines crun fails ("cgroups in hybrid mode not
# supported") and podman's default ulimits are refused ("setrlimit RLIMIT_NOFILE: Operation
# not permitted"). No registry is reachable, hence mmdebstrap for the base. See docs/rdma.md.
#
# Exit status: the suite's; 124 if the run ran past the limit; 125 if the guest could not boot
# or set up rxe, or podman could not start the container (the line before says which); 1 with
# a one-line `container: ...` message if a step before the run failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

base=localhost/mignet-debian12-base
image=localhost/mignet-rdma
limit="${MIGNET_CTR_TIMEOUT:-2400}"
mirror="${MIGNET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

say() { printf 'container: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

rebuild=0
build_only=0
while (($#)); do
    case "$1" in
        --rebuild) rebuild=1 ;;
        --build-only) build_only=1 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (tools/container.sh --help)" ;;
    esac
    shift
done
[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, mmdebstrap, podman)"
command -v apt-get >/dev/null || die "needs a Debian host (apt-get missing)"

# ---- 1. host packages -------------------------------------------------------------------
missing=()
for pkg in podman runc catatonit mmdebstrap; do
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
fi

# Explicit limits: podman's defaults are refused here, and so is anything above what podman's
# own processes have (measured: nofile 20000 = the host's, nproc 32768 though the host's is
# 96364). 16384 each, or the host's limit where lower, is ample for QEMU and the harness.
cap() { local v; v="$(ulimit "$1")"; [[ "$v" == unlimited || "$v" -gt 16384 ]] && v=16384; echo "$v"; }
nofile="$(cap -n)"; nproc="$(cap -u)"
run_opts=(--runtime runc --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

# ---- 2. the base image ---------------------------------------------------------------------
if ((rebuild)) && podman image exists "$base"; then
    podman rmi -f "$image" "$base" >/dev/null 2>&1 || true
fi
if ! podman image exists "$base"; then
    t0=$SECONDS
    tmp="$(mktemp -d /tmp/mignet-base.XXXXXX)"
    trap 'rm -rf "$tmp"' EXIT
    say "making $base with mmdebstrap (Debian 12 minbase)"
    mmdebstrap --variant=minbase --quiet bookworm "$tmp/base.tar" \
        "deb $mirror bookworm main" \
        "deb $mirror bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" >&2 \
        || die "mmdebstrap failed (is deb.debian.org reachable?)"
    podman import --change 'CMD ["/bin/bash"]' "$tmp/base.tar" "$base" >/dev/null \
        || die "podman import of the base rootfs failed"
    rm -rf "$tmp"
    trap - EXIT
    say "base image made in $((SECONDS - t0)) s"
fi

# ---- 3. the test image ---------------------------------------------------------------------
build_opts=(--build-arg "BASE=$base" --network host)
# Behind a TLS-intercepting proxy pip inside the build needs the host's CA bundle (build only).
ca=/etc/ssl/certs/ca-certificates.crt
if [[ -f "$ca" ]]; then
    build_opts+=(--volume "$ca:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
fi
t0=$SECONDS
say "building $image from Containerfile"
podman build "${run_opts[@]}" "${build_opts[@]}" -t "$image" -f Containerfile . >&2 \
    || die "podman build failed (see above)"
say "image built in $((SECONDS - t0)) s"
((build_only)) && exit 0

# ---- 4. the run ------------------------------------------------------------------------------
# --network none: the guest's rxe device sits on a dummy netdev inside the guest; nothing leaves.
# --init: catatonit as PID 1 passes SIGTERM (from timeout) on to the harness, which stops the guest.
name="mignet-rdma-$$"
trap 'podman rm -f -t 5 "$name" >/dev/null 2>&1 || true' EXIT
t0=$SECONDS
say "running the RDMA suite in $image (limit ${limit} s)"
set +e
timeout -k 30 "$limit" podman run "${run_opts[@]}" --rm --init --name "$name" --network none \
    -e MIGNET_RXE_TIMEOUT="$((limit > 600 ? limit - 300 : limit))" \
    "$image" tools/rxe/rdma-suite.sh "$@"
rc=$?
set -e
case $rc in
    0) say "RDMA suite passed in $((SECONDS - t0)) s" ;;
    124) say "RDMA suite ran past ${limit} s (MIGNET_CTR_TIMEOUT): container stopped" ;;
    125) say "status 125: the soft-RoCE guest could not boot or set up rxe, or podman could not start the container (the line above says which)" ;;
    *) say "RDMA suite failed with status $rc after $((SECONDS - t0)) s" ;;
esac
exit $rc
