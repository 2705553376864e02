# syntax=docker/dockerfile:1
# directfs as a container: the daemon in the foreground, its mount shared with the host or sibling containers.
#
#   docker build -t directfs .
#   docker run -d --name directfs --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor:unconfined \
#     -v /etc/directfs:/etc/directfs:ro --mount type=bind,src=/mnt/ctera,dst=/mnt/ctera,bind-propagation=rshared \
#     directfs projects
#
# Stage 1 builds wheels (pyfuse3 compiles against libfuse3 headers); stage 2 has only the fuse3 runtime.
# Every Python package comes from docker/requirements.lock (and the build tools from docker/build-requirements.lock),
# pinned and checked against its sha256 (--require-hashes); nothing is fetched unpinned, build requirements included.
#
# User: the daemon runs as `directfs` (uid 10001), and the mount is made by fusermount3, setuid root, with the
# capabilities the container's bounding set allows (--cap-add SYS_ADMIN). The host folder bind-mounted at the
# mountpoint must be writable by uid 10001 (fusermount3 checks), and the secret files under /etc/directfs owned by it
# with mode 0600 (a secret others may read draws a warning). What needs root, opt in with `--user root`:
#   - `--security-opt no-new-privileges` (Kubernetes: allowPrivilegeEscalation: false) turns the setuid bit off,
#     and a mountpoint the image's user may not write;
#   - raising the mount's bdi read-ahead (1 MiB kernel READs instead of 128 KiB: faster sequential reads), which
#     only uid 0 may write; as `directfs` the daemon warns once and reads in 128 KiB requests.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# gcc + pkg-config + libfuse3-dev: pyfuse3 is a C extension linked against libfuse3.
# DL3008: not pinned on purpose: the base image tracks Debian stable, whose point releases carry security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY docker/build-requirements.lock docker/requirements.lock ./docker/
# The build tools first, by hash. Then every dependency as a wheel: downloaded ones are checked against the lock, and
# the one sdist (pyfuse3) is built without build isolation, which would fetch its build requirements unpinned.
RUN pip install --no-cache-dir --require-hashes --no-deps -r docker/build-requirements.lock \
    && pip wheel --no-cache-dir --require-hashes --no-deps --no-build-isolation --wheel-dir /wheels \
        -r docker/requirements.lock
COPY pyproject.toml README.md ./
COPY directfs ./directfs
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# fuse3: libfuse3 for pyfuse3, fusermount3 (setuid root) for mounting as `directfs`, unmounting and stale-mount
# cleanup. Nothing else.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
# --no-index --no-deps: exactly the wheels stage 1 checked against the lock (and built from checked sources).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl \
    && rm -rf /wheels
COPY docker/entrypoint.sh /usr/local/bin/directfs-entrypoint
# The image's user, and the folders of the control socket for `directfs stats` (each 0700 and its user's own):
# $XDG_RUNTIME_DIR/directfs for `directfs`, /run/directfs under `--user root`. user_allow_other: without it
# fusermount3 refuses allow_other to a non-root user, and the programs reading the mount run as other uids.
RUN groupadd --system --gid 10001 directfs \
    && useradd --system --uid 10001 --gid directfs --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin directfs \
    && install -d -o directfs -g directfs -m 0700 /run/user/10001 \
    && install -d -m 0700 /run/directfs \
    && echo user_allow_other >> /etc/fuse.conf
ENV PYTHONUNBUFFERED=1
ENV XDG_RUNTIME_DIR=/run/user/10001
# Health: `directfs stats` answers only while the daemon serving the mountpoint runs (set it with -e).
ENV DIRECTFS_HEALTH_MOUNTPOINT=/mnt/ctera
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD ["/bin/sh", "-c", "directfs stats --raw \"$DIRECTFS_HEALTH_MOUNTPOINT\" > /dev/null"]
# The daemon unmounts and drains on SIGTERM; `docker stop -t` / the pod's grace period must exceed TimeoutStopSec-like
# drain time (a few seconds).
STOPSIGNAL SIGTERM
# Numeric: a runtime checking runAsNonRoot (Kubernetes) sees it is not root without the image's passwd.
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/directfs-entrypoint"]
