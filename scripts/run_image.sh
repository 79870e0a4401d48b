#!/usr/bin/env bash
# Run the swarmtrain image WITHOUT a Docker engine, the way
#   docker run --rm --network host -v HOST:CTR ... -e NAME=VALUE ... swarmtrain:latest ARGS...
# would: a throwaway buildah container, host networking (the container reaches the host's
# 127.0.0.1 and the host reaches its ports), the image's user (swarm, uid 1000), its
# ENTRYPOINT, and ARGS (the image's CMD when there are none). Needs root and buildah.
#
#   scripts/run_image.sh [--image TAG] [-v HOST:CTR[:ro]]... [-e NAME=VALUE]... [--user U]
#                        [--entrypoint PROG] [--] [ARGS...]
#
#   scripts/run_image.sh --help                                  # swarmtrain --help, in the image
#   scripts/run_image.sh -v "$PWD/data:/data:ro" -- run --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... \
#       --spec /data/spec.toml --data /data/train.txt
#
# SIGINT/SIGTERM are passed on to the program in the container; the container is removed on
# exit. The exit status is the program's. STORAGE_DRIVER (default vfs) must match the build.
# With vfs, starting takes ~25 s (the container is a full copy of the image); overlay: ~1 s.
set -euo pipefail

IMAGE=swarmtrain:latest
USER_NAME=
ENTRY=
opts=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --image) IMAGE="$2"; shift 2 ;;
        --image=*) IMAGE="${1#*=}"; shift ;;
        -v|--volume)
            spec="$2"; shift 2
            host="${spec%%:*}"; rest="${spec#*:}"
            [[ "$host" == /* ]] || host="$(cd "$(dirname "$host")" && pwd)/$(basename "$host")"
            [[ -e "$host" ]] || { echo "run_image.sh: no such host path: $host" >&2; exit 2; }
            opts+=(--volume "$host:$rest") ;;
        -e|--env) opts+=(--env "$2"); shift 2 ;;
        --user) USER_NAME="$2"; shift 2 ;;
        --entrypoint) ENTRY="$2"; shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

command -v buildah >/dev/null || { echo "run_image.sh: buildah is not installed (apt-get install -y buildah)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "run_image.sh: run as root (buildah chroot isolation needs it)" >&2; exit 2; }
DRIVER="${STORAGE_DRIVER:-vfs}"
BUILDAH=(buildah --storage-driver "$DRIVER")
if [[ "$DRIVER" != vfs ]]; then   # the same per-driver store as build_image.sh
    BUILDAH+=(--root "/var/lib/containers/storage-$DRIVER" --runroot "/run/containers/storage-$DRIVER")
fi

# The image's entrypoint, command and user, as `docker run` would use them.
config_json=$("${BUILDAH[@]}" inspect --type image "$IMAGE" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]))') \
    || { echo "run_image.sh: image $IMAGE not found: build it with scripts/build_image.sh" >&2; exit 2; }
mapfile -t entry < <(printf '%s' "$config_json" | python3 -c 'import json,sys; [print(a) for a in (json.load(sys.stdin).get("Entrypoint") or [])]')
mapfile -t cmd < <(printf '%s' "$config_json" | python3 -c 'import json,sys; [print(a) for a in (json.load(sys.stdin).get("Cmd") or [])]')
[[ -n "$USER_NAME" ]] || USER_NAME=$(printf '%s' "$config_json" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("User") or "root")')
[[ -z "$ENTRY" ]] || entry=("$ENTRY")
if [[ $# -gt 0 ]]; then argv=("${entry[@]}" "$@"); else argv=("${entry[@]}" "${cmd[@]}"); fi
[[ ${#argv[@]} -gt 0 ]] || { echo "run_image.sh: nothing to run" >&2; exit 2; }

NAME="swarmtrain-run-$$-$RANDOM"
child=
stop=
cleanup() {
    "${BUILDAH[@]}" rm "$NAME" >/dev/null 2>&1 || true
}
# buildah answers SIGTERM by SIGKILLing the program, so signals skip it: they go straight to
# the program (the child of buildah-chroot-exec; chroot isolation has no PID namespace), which
# then shuts down cleanly (hivemind stops its p2pd) and buildah exits with its status.
program_pids() {
    local queue=("$child") p q
    while [[ ${#queue[@]} -gt 0 ]]; do
        p=${queue[0]}; queue=("${queue[@]:1}")
        for q in $(pgrep -P "$p" 2>/dev/null); do
            if [[ "$(tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | head -n1)" == buildah-chroot-exec ]]; then
                echo "$q"
            else
                queue+=("$q")
            fi
        done
    done
}
forward() {
    stop=1
    [[ -n "$child" ]] || return 0
    local pids
    pids=$(program_pids)
    if [[ -n "$pids" ]]; then kill -"$1" $pids 2>/dev/null || true; else kill -"$1" "$child" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# (A signal during `buildah from` is acted on when it returns: nothing is left behind.)
"${BUILDAH[@]}" from --pull=never --name "$NAME" "$IMAGE" >/dev/null
[[ -z "$stop" ]] || exit 143

"${BUILDAH[@]}" run --isolation chroot --network host --user "$USER_NAME" "${opts[@]}" "$NAME" -- "${argv[@]}" &
child=$!
# `wait` returns early when a trapped signal arrives: keep waiting for the child itself.
rc=0
while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
done
exit "$rc"
