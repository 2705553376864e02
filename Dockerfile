# syntax=docker/dockerfile:1
# directfs as a container: the daemon in the foreground, its mount shared with the host or sibling containers.
#
#   docker build -t directfs .
#   docker run -d --name directfs --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor:unconfined \
#     -v /etc/directfs:/etc/directfs:ro --mount type=bind,src=/mnt/ctera,dst=/mnt/ctera,bind-propagation=rshared \
#     directfs projects
#
# Stage 1 builds wheels (pyfuse3 compiles against libfuse3 headers); stage 2 has only the fuse3 runtime.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# gcc + pkg-config + libfuse3-dev: pyfuse3 is a C extension linked against libfuse3.
# DL3008: not pinned on purpose: the base image tracks Debian stable, whose point releases carry security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY directfs ./directfs
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# fuse3: libfuse3 for pyfuse3, fusermount3 for unmounting and stale-mount cleanup. Nothing else.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
# DL3013: --no-index installs exactly the wheels built above; their versions are pinned by the build stage.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links=/wheels directfs \
    && rm -rf /wheels
COPY docker/entrypoint.sh /usr/local/bin/directfs-entrypoint
# The control socket for `directfs stats` lives here (the daemon runs as root: mounting needs CAP_SYS_ADMIN).
RUN mkdir -m 0700 /run/directfs
ENV PYTHONUNBUFFERED=1
# Health: `directfs stats` answers only while the daemon serving the mountpoint runs (set it with -e).
ENV DIRECTFS_HEALTH_MOUNTPOINT=/mnt/ctera
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD ["/bin/sh", "-c", "directfs stats --raw \"$DIRECTFS_HEALTH_MOUNTPOINT\" > /dev/null"]
# The daemon unmounts and drains on SIGTERM; `docker stop -t` / the pod's grace period must exceed TimeoutStopSec-like
# drain time (a few seconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/directfs-entrypoint"]
