"""A backend whose engines do what a test tells them: take this long, fail now, hang.

A model with ``backend: "enginehouse_fake"`` and any file ``1/model.fake`` serves through
the real loader, scheduler, batcher, lifecycle and frontends; its engine returns its
inputs, output ``i`` being input ``i`` (modulo the number of inputs) cast to the output's
datatype. What it does is set per model name at run time, through :func:`controls`:
latency, failures, a hang, a failing load; and it records what ran (batch sizes, the
device of each execution), so scheduler tests can assert on batches without timing them.
:func:`set_gpus` gives the process pretend GPUs, for placement across devices. Registered in
a process with :func:`install`; servers in a child process do not have it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.backends import register_backend
from enginehouse.backends.base import Backend, Engine, Placement
from enginehouse.errors import ModelLoadError

NAME = "enginehouse_fake"


@dataclass
class FakeControls:
    """What the engines of one fake model do, and what they saw; read and set from any
    thread (each field is read once per execution)."""

    # Seconds each execution takes (slept, the GIL released, as a real runtime does).
    latency_s: float = 0.0
    # The next this many executions raise (a backend failure: the instance is replaced).
    fail_next: int = 0
    # While set, executions block until it is cleared (a hung engine).
    hang: threading.Event = field(default_factory=threading.Event)
    # Loading an engine raises with this reason ("" loads).
    load_error: str = ""
    # The batch size (first dimension of the first input) of every execution, in order.
    batches: list[int] = field(default_factory=list)
    # The placement (``cpu``, ``gpu:N``) of every execution, in order.
    devices: list[str] = field(default_factory=list)
    loads: int = 0
    closes: int = 0
    cancels: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Back to the defaults, in place: engines already loaded hold this object."""
        self.latency_s = 0.0
        self.fail_next = 0
        self.hang.clear()
        self.load_error = ""
        self.batches.clear()
        self.devices.clear()
        self.loads = self.closes = self.cancels = 0

    def take_failure(self) -> bool:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False


_CONTROLS: dict[str, FakeControls] = {}
# How many GPUs the fake backend pretends this process sees.
_gpus = 0


def set_gpus(count: int) -> None:
    """Pretend this process sees ``count`` GPUs (0: none, the default); :func:`reset`
    returns to none."""
    global _gpus
    _gpus = count


def controls(model: str) -> FakeControls:
    """The controls of the fake model ``model``, made on first use."""
    found = _CONTROLS.get(model)
    if found is None:
        found = _CONTROLS[model] = FakeControls()
    return found


def reset() -> None:
    """Every model's controls back to the defaults (a test's fixture calls it between
    tests; engines that stay loaded keep following them)."""
    for model in _CONTROLS.values():
        model.reset()
    set_gpus(0)


class FakeEngine(Engine):
    """Returns its inputs after the latency its controls ask for; fails or hangs on demand."""

    def __init__(
        self, controls: FakeControls, config: mc.ModelConfig, placement: Placement
    ) -> None:
        self._controls = controls
        self._device = placement.label
        self._inputs = [t.name for t in config.input]
        self._dtypes = {t.name: datatypes.BY_CONFIG[t.data_type].numpy for t in config.output}
        self._order = {t.name: i for i, t in enumerate(config.output)}
        self._cancelled = threading.Event()

    def execute(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        controls = self._controls
        first = next(iter(inputs.values()))
        controls.batches.append(int(first.shape[0]) if first.ndim else 1)
        controls.devices.append(self._device)
        while controls.hang.is_set() and not self._cancelled.is_set():
            time.sleep(0.005)
        if self._cancelled.is_set():
            self._cancelled.clear()
            raise RuntimeError("fake engine: execution cancelled")
        if controls.latency_s:
            time.sleep(controls.latency_s)
        if controls.take_failure():
            raise RuntimeError("fake engine: failure asked for by the test")
        present = [name for name in self._inputs if name in inputs]
        outputs = []
        for name in output_names:
            source = inputs[present[self._order[name] % len(present)]]
            outputs.append(np.array(source, dtype=self._dtypes[name]))
        return outputs

    def cancel(self) -> None:
        self._controls.cancels += 1
        self._cancelled.set()

    def close(self) -> None:
        self._controls.closes += 1


class FakeBackend(Backend):
    """Serves ``enginehouse_fake`` models with :class:`FakeEngine`s."""

    name = NAME
    platform = NAME
    default_filenames = ("model.fake",)

    def complete_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> mc.ModelConfig:
        if not config.input or not config.output:
            raise ModelLoadError(f"model '{config.name}': a fake model's config lists its tensors")
        return config

    def check_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> None:
        self.complete_config(config, model_file)

    def has_gpu(self) -> bool:
        return _gpus > 0

    def gpu_count(self) -> int:
        return _gpus

    def load(
        self,
        config: mc.ModelConfig,
        model_file: Path,
        placement: Placement,
        optimized: bool = False,
    ) -> Engine:
        model = controls(config.name)
        if model.load_error:
            raise ModelLoadError(f"model '{config.name}': {model.load_error}")
        if placement.kind == mc.ModelInstanceGroup.KIND_GPU and placement.device_id >= _gpus:
            raise ModelLoadError(
                f"model '{config.name}': instance_group names GPU {placement.device_id}, but "
                f"this process sees {_gpus}"
            )
        model.loads += 1
        return FakeEngine(model, config, placement)


FAKE_CONFIG = """name: "{name}"
backend: "enginehouse_fake"
max_batch_size: {max_batch_size}
input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [{dims}] }}]
output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [{dims}] }}]
instance_group [{{ count: {count} kind: KIND_CPU }}]
{extra}
"""


def write_model(
    root: Path,
    name: str,
    *,
    max_batch_size: int = 8,
    dims: str = "4",
    count: int = 1,
    extra: str = "",
    versions: Sequence[int] = (1,),
) -> Path:
    """A fake model folder under ``root``: FP32 INPUT0 -> OUTPUT0 of ``dims``."""
    folder = root / name
    for version in versions:
        (folder / str(version)).mkdir(parents=True, exist_ok=True)
        (folder / str(version) / "model.fake").write_bytes(b"fake")
    (folder / "config.pbtxt").write_text(
        FAKE_CONFIG.format(
            name=name, max_batch_size=max_batch_size, dims=dims, count=count, extra=extra
        )
    )
    return folder


def install() -> None:
    """Register the fake backend in this process (idempotent)."""
    register_backend(FakeBackend())
