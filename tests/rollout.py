"""Rolling a model between versions under live traffic, and checking every answer.

The model of version ``v`` multiplies its input by ``v``, so each response proves which
version computed it. :class:`VersionedTraffic` keeps client threads (gRPC and HTTP mixed)
sending unversioned requests; :class:`Rollout` moves the model from version to version,
through polling (rewriting config.pbtxt) or through the repository API (a load with a
config override), and remembers when each step began. :func:`check` then finds every
failed request and every answer from a version that was not serving while it was in
flight. The soak test and ``bench/rollouts.py`` both drive this.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper

from enginehouse.testing import ServerProcess

WIDTH = 4


def scale_model(factor: int, width: int = WIDTH) -> onnx.ModelProto:
    """OUTPUT0 = factor * INPUT0, FP32 [batch, width]."""
    scale = numpy_helper.from_array(np.array(float(factor), np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "scale"], ["OUTPUT0"])],
        "scale",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def rollout_config(version: int, warmup_count: int) -> dict[str, object]:
    """The model's config as Triton JSON: serve only ``version``, with a warm-up that
    runs ``warmup_count`` batches of 64 so that loading a version takes a while."""
    return {
        "backend": "onnxruntime",
        "max_batch_size": 64,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [WIDTH]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [WIDTH]}],
        "version_policy": {"specific": {"versions": [version]}},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "parameters": {"intra_op_thread_count": {"string_value": "1"}},
        "model_warmup": [
            {
                "name": "batch64",
                "batch_size": 64,
                "count": warmup_count,
                "inputs": {
                    "INPUT0": {"data_type": "TYPE_FP32", "dims": [WIDTH], "random_data": True}
                },
            }
        ],
    }


def to_pbtxt(config: dict[str, object]) -> str:
    """config.pbtxt text for a Triton JSON config."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    message = json_format.ParseDict(config, mc.ModelConfig())
    return str(text_format.MessageToString(message))


def write_model(root: Path, name: str, versions: Sequence[int], first: int, warmup: int) -> None:
    """A model folder holding every version in ``versions``, configured to serve ``first``."""
    for version in versions:
        folder = root / name / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(scale_model(version), str(folder / "model.onnx"))
    (root / name / "config.pbtxt").write_text(to_pbtxt(rollout_config(first, warmup)))


@dataclass(slots=True)
class Sample:
    """One request: when it was sent and answered, by which version, and any error."""

    sent: float
    done: float
    version: int
    error: str = ""


@dataclass
class VersionedTraffic:
    """Client threads sending unversioned requests, alternately over gRPC and HTTP."""

    server: ServerProcess
    model: str
    threads: int = 32
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(index,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> list[Sample]:
        self._stop.set()
        for worker in self._workers:
            worker.join()
        return sorted(self.samples, key=lambda s: s.sent)

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        found: list[Sample] = []
        use_grpc = index % 2 == 0
        module: Any = grpcclient if use_grpc else httpclient
        client: Any = (
            grpcclient.InferenceServerClient(self.server.grpc_url)
            if use_grpc
            else httpclient.InferenceServerClient(self.server.http_url, network_timeout=60)
        )
        while not self._stop.is_set():
            data = rng.integers(1, 100, (1, WIDTH)).astype(np.float32)
            item = module.InferInput("INPUT0", [1, WIDTH], "FP32")
            item.set_data_from_numpy(data)
            sent = time.monotonic()
            try:
                result = client.infer(self.model, [item])
            except Exception as exc:
                found.append(Sample(sent, time.monotonic(), 0, f"{type(exc).__name__}: {exc}"))
                continue
            done = time.monotonic()
            response = result.get_response()
            version = int(response.model_version if use_grpc else response["model_version"])
            output = result.as_numpy("OUTPUT0")
            error = "" if np.array_equal(output, data * version) else "output of another version"
            found.append(Sample(sent, done, version, error))
        client.close()
        self.samples.extend(found)  # list.extend is atomic under the GIL


@dataclass(slots=True)
class Step:
    """One move of the rollout: to ``version``, begun at ``started``, serving at ``ready``."""

    version: int
    started: float
    ready: float = 0.0


@dataclass
class Rollout:
    """Moves a model through versions by polling or the repository API, timing each step."""

    server: ServerProcess
    root: Path
    model: str
    first: int
    warmup: int
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.steps.append(Step(self.first, 0.0, 0.0))

    def by_api(self, version: int) -> None:
        step = Step(version, time.monotonic())
        client = httpclient.InferenceServerClient(self.server.http_url, network_timeout=120)
        config = rollout_config(version, self.warmup)
        client.load_model(self.model, config=json.dumps(config))
        client.close()
        step.ready = time.monotonic()
        self.steps.append(step)

    def by_poll(self, version: int, timeout_s: float = 60.0) -> None:
        step = Step(version, time.monotonic())
        path = self.root / self.model / "config.pbtxt"
        staged = path.with_suffix(".new")
        staged.write_text(to_pbtxt(rollout_config(version, self.warmup)))
        staged.replace(path)  # atomic, as repositories should be updated
        client = httpclient.InferenceServerClient(self.server.http_url)
        deadline = time.monotonic() + timeout_s
        want = [(str(version), "READY")]
        while time.monotonic() < deadline:
            index = client.get_model_repository_index()
            states = [(e.get("version", ""), e.get("state", "")) for e in index]
            if states == want:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"version {version} did not become the only ready version")
        client.close()
        step.ready = time.monotonic()
        self.steps.append(step)


def check(samples: list[Sample], steps: list[Step]) -> list[str]:
    """Every failed request, and every answer from a version that did not serve while the
    request was in flight: a step's version serves from its start until the next step
    starts; the version before it serves requests sent until the step is ready."""
    problems: list[str] = []
    for sample in samples:
        if sample.error:
            problems.append(f"request at {sample.sent:.3f}: {sample.error}")
            continue
        allowed: set[int] = set()
        for i, step in enumerate(steps):
            end = steps[i + 1].started if i + 1 < len(steps) else float("inf")
            if step.started <= sample.done and sample.sent <= end:
                allowed.add(step.version)
            if i > 0 and step.started <= sample.sent <= step.ready:
                allowed.add(steps[i - 1].version)
        if sample.version not in allowed:
            problems.append(
                f"request at {sample.sent:.3f} answered by version {sample.version}, "
                f"serving then: {sorted(allowed)}"
            )
    return problems


def p99_ms(samples: list[Sample]) -> float:
    latencies = [s.done - s.sent for s in samples if not s.error]
    return float(np.percentile(latencies, 99) * 1000) if latencies else float("nan")


@dataclass(slots=True)
class SoakResult:
    """What one soak run saw: the checks' findings and latency at rest and in rollouts."""

    mode: str
    rollouts: int
    requests: int
    problems: list[str]
    p99_rest_ms: float
    p99_rollout_ms: float
    rollout_s: list[float]
    samples: list[Sample] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @property
    def p99_ratio(self) -> float:
        return self.p99_rollout_ms / self.p99_rest_ms


def soak(
    workdir: Path,
    mode: str,
    rollouts: int = 10,
    threads: int = 32,
    warmup: int = 300,
    rest_s: float = 3.0,
    sequence: Sequence[int] = (2, 3, 2, 1),
    log: bool = False,
) -> SoakResult:
    """Serve the scale model (versions 1-3) in ``mode`` ("poll" or "api"), measure latency at
    rest under traffic, then roll it ``rollouts`` times through ``sequence`` under the same
    traffic and check every answer."""
    root = workdir / f"repo-{mode}"
    name = "rolled"
    write_model(root, name, (1, 2, 3), first=1, warmup=warmup)
    control = (
        ["--model-control-mode", "poll", "--repository-poll-secs", "0.1"]
        if mode == "poll"
        else ["--model-control-mode", "explicit", "--load-model", name]
    )
    with ServerProcess([root], *control, log_path=workdir / f"{mode}.log") as server:
        server.wait_ready()
        rollout = Rollout(server, root, name, first=1, warmup=warmup)
        traffic = VersionedTraffic(server, name, threads)
        traffic.start()
        time.sleep(rest_s)
        rest_end = time.monotonic()
        durations: list[float] = []
        for i in range(rollouts):
            version = sequence[i % len(sequence)]
            (rollout.by_poll if mode == "poll" else rollout.by_api)(version)
            step = rollout.steps[-1]
            durations.append(step.ready - step.started)
            if log:
                print(f"  {mode}: v{version} serving after {durations[-1]:.2f} s", flush=True)
        samples = traffic.stop()
    rest = [s for s in samples if s.done <= rest_end and s.sent >= rest_end - rest_s + 1.0]
    rolling = [s for s in samples if s.sent > rest_end]
    return SoakResult(
        mode,
        rollouts,
        len(samples),
        check(samples, rollout.steps),
        p99_ms(rest),
        p99_ms(rolling),
        durations,
        samples,
        rollout.steps,
    )
