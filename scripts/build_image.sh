#!/usr/bin/env bash
# Build the swarmtrain image WITHOUT a Docker engine, with buildah.
#
#   sudo scripts/build_image.sh [--tag swarmtrain:latest] [--gpu] [--rebuild-base] [--no-base] [--keep-old]
#
# Steps (each prints a "==>" line; any failure stops the script with a message):
#   1. buildah and debootstrap: installed with apt-get when missing (needs root).
#   2. the base image `python:3.11-slim`: registry images cannot be pulled on every machine,
#      so a stand-in is made locally with debootstrap (Debian bookworm minbase + python3 3.11,
#      python3-venv, python3-pip, ca-certificates). /usr/local is a venv, so `python`, `python3`
#      and `pip` live at /usr/local/bin as in the official image and `pip install` works as
#      root. The rootfs is cached under $SWARMTRAIN_BASE_DIR (default /var/tmp/swarmtrain-base)
#      and the image is not re-imported when it is already in buildah's storage.
#      The host's extra CA certificates (/usr/local/share/ca-certificates/*.crt, e.g. of a
#      TLS-intercepting egress proxy) are added to the stand-in's trust store so that pip
#      inside the build can reach PyPI the way the host does.
#      --no-base skips this step (use a real python:3.11-slim already in storage).
#   3. the torch CPU wheel: copied from $SWARMTRAIN_WHEELS (default /opt/wheels) into
#      docker/wheels/ (gitignored) when present; otherwise the Dockerfile uses the PyTorch CPU
#      index.
#   4. buildah bud --storage-driver vfs --isolation chroot -t TAG -f docker/Dockerfile .
#   5. `buildah rmi --prune`: the untagged images that earlier builds left behind (with vfs each
#      costs ~10 GB of disk); the layer cache of the new image stays. --keep-old skips it.
#
# Environment: SWARMTRAIN_BASE_DIR, SWARMTRAIN_WHEELS, DEBIAN_MIRROR (default
# http://deb.debian.org/debian), TORCH_VERSION (default 2.13.0), STORAGE_DRIVER (default vfs:
# works everywhere, even nested, but every layer is a full copy, so a rebuild after a source
# change takes minutes; STORAGE_DRIVER=overlay, where the kernel allows it, is several times
# faster and keeps its own store in /var/lib/containers/storage-overlay; scripts/run_image.sh
# and tests/integration/test_docker.py must then get the same STORAGE_DRIVER).
set -euo pipefail

TAG=swarmtrain:latest
GPU=0
REBUILD_BASE=0
MAKE_BASE=1
PRUNE=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) TAG="$2"; shift 2 ;;
        --tag=*) TAG="${1#*=}"; shift ;;
        --gpu) GPU=1; shift ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --no-base) MAKE_BASE=0; shift ;;
        --keep-old) PRUNE=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "build_image.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_DIR="${SWARMTRAIN_BASE_DIR:-/var/tmp/swarmtrain-base}"
ROOTFS="$BASE_DIR/rootfs"
WHEELS_SRC="${SWARMTRAIN_WHEELS:-/opt/wheels}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DRIVER="${STORAGE_DRIVER:-vfs}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
BASE_IMAGE="docker.io/library/python:3.11-slim"   # what `FROM python:3.11-slim` resolves to
BUILDAH=(buildah --storage-driver "$DRIVER")
# Each storage driver gets its own store: one store cannot mix drivers.
if [[ "$DRIVER" != vfs ]]; then
    BUILDAH+=(--root "/var/lib/containers/storage-$DRIVER" --runroot "/run/containers/storage-$DRIVER")
fi
# Bump when the base recipe below changes: a cached rootfs of another recipe is rebuilt.
BASE_RECIPE=1

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf '\nbuild_image.sh: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [[ $rc -ne 0 ]] && printf "\nbuild_image.sh: FAILED (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------- 1. tools
say "checking tools (buildah, debootstrap)"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
if [[ $MAKE_BASE == 1 ]]; then command -v debootstrap >/dev/null || missing+=(debootstrap); fi
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (apt-get install -y ${missing[*]}) or run as root"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} with apt-get"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
[[ $(id -u) == 0 ]] || die "run as root: debootstrap and chroot isolation need it"
buildah --version >&2

# ---------------------------------------------------------------- 2. base image
if [[ $MAKE_BASE == 1 ]]; then
    if [[ $REBUILD_BASE == 1 ]]; then
        say "--rebuild-base: removing $ROOTFS and $BASE_IMAGE"
        rm -rf "$ROOTFS"
        "${BUILDAH[@]}" rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
    fi
    if "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE already in buildah storage ($DRIVER): reusing it"
    else
        if [[ -f "$ROOTFS/.swarmtrain-base-complete" && "$(cat "$ROOTFS/.swarmtrain-base-complete")" == "$BASE_RECIPE" ]]; then
            say "reusing cached rootfs $ROOTFS"
        else
            say "debootstrap: Debian bookworm minbase + python3 into $ROOTFS (a few minutes)"
            rm -rf "$ROOTFS"
            mkdir -p "$BASE_DIR"
            debootstrap --variant=minbase \
                --include=python3,python3-venv,python3-pip,ca-certificates \
                bookworm "$ROOTFS" "$MIRROR"
            say "configuring the stand-in base (venv at /usr/local, CA certificates, cleanup)"
            shopt -s nullglob
            extra_ca=(/usr/local/share/ca-certificates/*.crt)
            shopt -u nullglob
            if [[ ${#extra_ca[@]} -gt 0 ]]; then
                echo "adding host CA certificates: ${extra_ca[*]}" >&2
                mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
                cp "${extra_ca[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
            fi
            # The official image installs Python under /usr/local; a venv there gives the same
            # paths (/usr/local/bin/python, python3, pip, pip3) and a writable site-packages.
            chroot "$ROOTFS" /bin/sh -euc '
                set -x
                update-ca-certificates
                python3 -m venv /usr/local
                ln -sf python3 /usr/local/bin/python3.11
                /usr/local/bin/python --version
                /usr/local/bin/pip --version
                set +x
                echo "removing apt lists, docs, man pages, locales"
                apt-get clean
                rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* \
                       /usr/share/info/* /usr/share/locale/* /var/log/*.log /tmp/*
            '
            echo "$BASE_RECIPE" > "$ROOTFS/.swarmtrain-base-complete"
        fi
        say "importing $ROOTFS as $BASE_IMAGE (buildah from scratch + copy + commit)"
        ctr=$("${BUILDAH[@]}" from scratch)
        mnt=$("${BUILDAH[@]}" mount "$ctr")
        # tar keeps owners, modes, links and setuid bits; the cache stamp stays out.
        tar -C "$ROOTFS" --exclude=./.swarmtrain-base-complete -cf - . | tar -C "$mnt" -xpf -
        "${BUILDAH[@]}" umount "$ctr" >/dev/null
        "${BUILDAH[@]}" config \
            --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
            --env LANG=C.UTF-8 \
            --env PYTHON_VERSION=3.11 \
            --cmd python3 \
            --label org.opencontainers.image.description="local stand-in for python:3.11-slim (debootstrap bookworm)" \
            "$ctr"
        "${BUILDAH[@]}" commit --rm "$ctr" "$BASE_IMAGE"
    fi
fi

# ---------------------------------------------------------------- 3. torch wheel
mkdir -p "$ROOT/docker/wheels"
if [[ $GPU == 0 ]]; then
    shopt -s nullglob
    wheels=("$WHEELS_SRC"/torch-"$TORCH_VERSION"+cpu-*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -gt 0 ]]; then
        for w in "${wheels[@]}"; do
            if [[ ! -f "$ROOT/docker/wheels/$(basename "$w")" ]]; then
                say "copying $(basename "$w") into docker/wheels/ (gitignored)"
                cp "$w" "$ROOT/docker/wheels/"
            else
                say "docker/wheels/$(basename "$w") already present"
            fi
        done
    else
        say "no torch $TORCH_VERSION CPU wheel in $WHEELS_SRC: the build will use the PyTorch CPU index"
    fi
fi

# ---------------------------------------------------------------- 4. build
say "buildah bud -t $TAG (GPU=$GPU; this installs torch and the dependencies: many minutes on first build)"
start=$(date +%s)
cd "$ROOT"
"${BUILDAH[@]}" bud \
    --isolation chroot \
    --network host \
    --layers \
    --pull=never \
    --build-arg GPU="$GPU" \
    --build-arg TORCH_VERSION="$TORCH_VERSION" \
    -t "$TAG" \
    -f docker/Dockerfile \
    .
say "built $TAG in $(( $(date +%s) - start ))s"
if [[ $PRUNE == 1 ]]; then
    say "removing untagged images left by earlier builds (--keep-old keeps them)"
    "${BUILDAH[@]}" rmi --prune >/dev/null || echo "build_image.sh: warning: buildah rmi --prune failed" >&2
fi
"${BUILDAH[@]}" images "$TAG"
