"""The image, built and run for real: buildah builds the Containerfile on a local Debian base
(mmdebstrap; no registry is reachable here), the server runs from the image's root filesystem
mounted read-only, as its non-root user, and tritonclient gets the right answers with every
engine a cache hit. A rebuild after a model change reuses the dependency and application
layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from make_repository import make_repository

from enginehouse.testing import free_ports
from tests.deploy.conftest import DEPLOY, ROOT, tool

TAG = "localhost/enginehouse:deploy-test"


def build(repository: Path, log: Path) -> tuple[str, float]:
    """(buildah's output, seconds) of deploy/image/build.sh for ``repository``."""
    started = time.perf_counter()
    result = subprocess.run(
        [
            "bash",
            str(DEPLOY / "image" / "build.sh"),
            "--base",
            "debian",
            "--offline",
            "--repository",
            str(repository),
            "--tag",
            TAG,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
        if (ROOT / ".venv" / "bin" / "python").exists()
        else None,
    )
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    print(result.stdout.strip().splitlines()[-1])
    return result.stdout + result.stderr, time.perf_counter() - started


def layers(image: str) -> list[str]:
    """The digests of an image's filesystem layers, base first."""
    result = subprocess.run(
        [
            tool("buildah"),
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.OCIv1.RootFS.DiffIDs}}",
            image,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().strip("[]").split()


class ReadOnlyContainer:
    """The server started from the image's filesystem: mounted read-only (as Kubernetes'
    readOnlyRootFilesystem), /tmp a tmpfs (the one declared volume), run as the image's
    non-root user, on the host's network (buildah's chroot isolation offers no read-only
    root, so the mount is made here, in a private mount namespace)."""

    def __init__(self, image: str, log: Path) -> None:
        self.container = subprocess.run(
            [tool("buildah"), "from", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.root = subprocess.run(
            [tool("buildah"), "mount", self.container], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        root = self.root
        script = (
            f"mount --bind {root} {root} && mount -t proc proc {root}/proc"
            f" && mount --rbind /dev {root}/dev && mount -t tmpfs -o size=256m tmpfs {root}/tmp"
            f" && mount -o remount,bind,ro {root}"
            f" && exec chroot --userspec=10001:10001 {root} env HOME=/tmp PYTHONPATH=/opt/app"
            " /opt/enginehouse/bin/python -m enginehouse.cli serve --host 127.0.0.1"
            f" --http-port {self.http_port} --grpc-port {self.grpc_port}"
            f" --metrics-port {self.metrics_port} --model-repository /models"
            " --engine-cache /engines"
        )
        self.log = log
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if client.is_server_ready():
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise AssertionError(f"not ready: {self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        subprocess.run([tool("buildah"), "umount", self.container], capture_output=True)
        subprocess.run([tool("buildah"), "rm", self.container], capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, float]]:
    for name in ("buildah", "mmdebstrap", "unshare", "chroot"):
        tool(name)
    folder = tmp_path_factory.mktemp("image")
    repository = make_repository(folder / "repo", with_torch=False)
    output, seconds = build(repository, folder / "build.log")
    yield repository, output, seconds


def test_the_image_serves_from_a_read_only_root_with_cache_hits(
    image: tuple[Path, str, float], tmp_path: Path
) -> None:
    container = ReadOnlyContainer(TAG, tmp_path / "server.log")
    try:
        container.wait_ready()
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        for module, port in ((httpclient, container.http_port), (grpcclient, container.grpc_port)):
            client = module.InferenceServerClient(f"127.0.0.1:{port}")
            inputs = [
                module.InferInput("INPUT0", [1, 16], "INT32"),
                module.InferInput("INPUT1", [1, 16], "INT32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer("simple", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    finally:
        container.stop()
    log = container.log.read_text()
    assert "engine cache hit" in log
    assert "building" not in log  # every engine was built into the image
    assert "Traceback" not in log
    assert "mapping guard was not built" not in log  # shared-memory regions are mapped


def test_the_runtime_stage_is_lean_and_unprivileged(image: tuple[Path, str, float]) -> None:
    inspect = subprocess.run(
        [tool("buildah"), "inspect", "--type", "image", TAG],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"User": "10001:10001"' in inspect
    for port in ("8000/tcp", "8001/tcp", "8002/tcp"):
        assert port in inspect
    container = subprocess.run(
        [tool("buildah"), "from", TAG], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        root = Path(
            subprocess.run(
                [tool("buildah"), "mount", container], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        for compiler in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/make", "usr/bin/g++"):
            assert not (root / compiler).exists(), compiler
        # The mapping guard and the FP16 staging conversion, compiled in a stage of their own
        # for the image's Python.
        assert list((root / "opt" / "app" / "enginehouse" / "core").glob("_mapping_guard*.so"))
        assert list((root / "opt" / "app" / "enginehouse" / "backends").glob("_staging*.so"))
        compiled = list((root / "opt" / "app" / "enginehouse").rglob("*.pyc"))
        sources = list((root / "opt" / "app" / "enginehouse").rglob("*.py"))
        assert len(compiled) >= len(sources)  # bytecode compiled at build time
    finally:
        subprocess.run([tool("buildah"), "umount", container], capture_output=True)
        subprocess.run([tool("buildah"), "rm", container], capture_output=True)


def test_a_model_change_rebuilds_only_the_last_layers(
    image: tuple[Path, str, float], tmp_path: Path
) -> None:
    repository, _, first_seconds = image
    changed = tmp_path / "repo"
    shutil.copytree(repository, changed)
    shutil.rmtree(changed / "identity_fp64")
    before = layers(TAG)
    output, seconds = build(changed, tmp_path / "rebuild.log")
    after = layers(TAG)
    # The runtime image's layers: the base, the dependencies, the application, the models,
    # their engines. The first three are the very same layers; the last two are new.
    assert len(after) == len(before) >= 5, (before, after)
    assert after[:3] == before[:3]
    assert after[3] != before[3] and after[4] != before[4]
    assert "Installing collected packages" not in output
    print(f"first build {first_seconds:.0f} s, rebuild after a model change {seconds:.0f} s")
