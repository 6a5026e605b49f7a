"""Instance groups across GPUs, as Triton places them: ``count`` instances on each listed
GPU, on every GPU the process sees when the group lists none, instances numbered across the
group's devices, and batches spread over all of them while requests wait. The GPUs are the
fake backend's pretend devices (tests/gpu covers a real one)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from enginehouse.testing import InProcessServer, fake_backend

CONFIG = """name: "{name}"
backend: "enginehouse_fake"
max_batch_size: 8
input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [4] }}]
output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [4] }}]
instance_group [{{ count: 2 kind: KIND_GPU {gpus} }}]
"""


def write(root: Path, name: str, gpus: str = "") -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.fake").write_bytes(b"fake")
    (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, gpus=gpus))


def infer_at_once(url: str, model: str, count: int) -> list[np.ndarray]:
    """``count`` requests at once, each from a thread and client of its own."""
    answers: list[np.ndarray] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        client = httpclient.InferenceServerClient(url)
        item = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        item.set_data_from_numpy(np.full((1, 4), i, np.float32))
        barrier.wait()
        answers.append(client.infer(model, [item]).as_numpy("OUTPUT0"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_a_group_without_gpus_has_its_instances_on_every_gpu(tmp_path: Path) -> None:
    fake_backend.set_gpus(2)
    root = tmp_path / "repo"
    write(root, "everywhere")
    write(root, "listed", gpus="gpus: [1]")
    server = InProcessServer([root], log_path=tmp_path / "serve.log")
    try:
        server.wait_live()
        fake_backend.controls("everywhere").latency_s = 0.1
        fake_backend.controls("everywhere").devices.clear()  # the warm-up runs
        fake_backend.controls("listed").devices.clear()
        client = httpclient.InferenceServerClient(server.http_url)
        group = client.get_model_config("everywhere")["instance_group"][0]
        assert group["gpus"] == [0, 1]
        assert group["count"] == 2
        log = server.log()
        for number, device in ((0, 0), (1, 0), (2, 1), (3, 1)):
            assert f"instance everywhere_0_{number}_v1 on gpu:{device}" in log, log

        # Eight requests at once, each holding an instance for 100 ms: all four instances
        # take some, two on each GPU, and none waits while another is idle.
        answers = infer_at_once(server.http_url, "everywhere", 8)
        assert sorted(int(a[0, 0]) for a in answers) == list(range(8))
        devices = fake_backend.controls("everywhere").devices
        assert devices.count("gpu:0") == 4 and devices.count("gpu:1") == 4, devices

        assert client.get_model_config("listed")["instance_group"][0]["gpus"] == [1]
        infer_at_once(server.http_url, "listed", 2)
        assert set(fake_backend.controls("listed").devices) == {"gpu:1"}
    finally:
        server.stop()


def test_a_listed_gpu_that_is_not_there_fails_only_that_model(tmp_path: Path) -> None:
    fake_backend.set_gpus(1)
    root = tmp_path / "repo"
    write(root, "too_many", gpus="gpus: [0, 1]")
    write(root, "fits", gpus="gpus: [0]")
    server = InProcessServer([root], log_path=tmp_path / "serve.log")
    try:
        server.wait_live(ready_log=False)
        client = httpclient.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + 30
        while True:
            # A model listed before its load begins has no state yet.
            index = {m["name"]: m for m in client.get_model_repository_index()}
            states = {index[name].get("state", "") for name in ("too_many", "fits")}
            if not states & {"", "LOADING"}:
                break
            assert time.monotonic() < deadline, index
            time.sleep(0.01)
        assert index["too_many"]["state"] == "UNAVAILABLE"
        assert "names GPU 1" in index["too_many"]["reason"], index["too_many"]
        assert client.is_model_ready("fits")
        assert len(infer_at_once(server.http_url, "fits", 2)) == 2
    finally:
        server.stop()
