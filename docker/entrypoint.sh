#!/bin/sh
# directfs container entrypoint: run the daemon in the foreground as PID 1's only child-free process.
#
#   docker run --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor:unconfined \
#     -v /mnt/ctera:/mnt/ctera:rshared -v /etc/directfs:/etc/directfs:ro IMAGE projects
#
# Arguments:  NAME [MOUNTPOINT] [flags]  -> directfs mount --foreground NAME [MOUNTPOINT] [flags]
#             URL MOUNTPOINT [flags]     -> the same with a URL
#             -- COMMAND ...             -> run COMMAND instead (e.g. `-- directfs stats /mnt/ctera`)
# `exec` replaces this shell, so SIGTERM from `docker stop` / the kubelet reaches the daemon itself: it unmounts,
# drains, and exits 0. A stale mount from a killed predecessor is cleaned by the daemon before it mounts.
set -eu

DIRECTFS_BIN="${DIRECTFS_BIN:-directfs}"

if [ "$#" -eq 0 ]; then
    echo "usage: entrypoint.sh NAME|URL [MOUNTPOINT] [directfs mount flags] | -- COMMAND..." >&2
    exit 64
fi

if [ "$1" = "--" ]; then
    shift
    exec "$@"
fi

case "$1" in
    -*)
        echo "entrypoint.sh: the first argument must be a source NAME or URL, not the flag $1" >&2
        exit 64
        ;;
esac

exec "$DIRECTFS_BIN" mount --foreground "$@"
