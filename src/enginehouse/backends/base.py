"""What a runtime fills in to serve models: a backend that loads engines.

A backend knows one kind of model file. It completes and checks a model's config against
the file, and loads an :class:`Engine` per instance. An engine is used by one instance
thread at a time; it never sees the scheduler or the frontends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.messages import OutputTargets, Tensor


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an instance runs: KIND_CPU, or KIND_GPU with a device index."""

    kind: int
    device_id: int = 0

    @property
    def label(self) -> str:
        return "cpu" if self.kind == mc.ModelInstanceGroup.KIND_CPU else f"gpu:{self.device_id}"


class Waker(Protocol):
    """A file descriptor that the device makes readable as its executions end, counting
    them (see backends/stream_wake.py)."""

    received: int

    def fileno(self) -> int: ...

    def drain(self) -> None:
        """Read the descriptor, adding what arrived to :attr:`received`."""


class Launched(ABC):
    """An execution started on a device and not waited for: the event loop's thread checks
    :meth:`done` when the :attr:`waker` says so (or now and then, without one) and takes
    the outputs once it is."""

    # When the engine expects it to be done, in ``time.perf_counter()`` seconds.
    expected_at: float = 0.0
    # Where the end will be signalled: done once ``waker.received >= ticket``.
    waker: Waker | None = None
    ticket: int = 0

    @abstractmethod
    def done(self) -> bool:
        """Whether the execution has finished (never blocks)."""

    @abstractmethod
    def outputs(self) -> list[np.ndarray]:
        """The named outputs, in order, as arrays of their own (call once done)."""


class Engine(ABC):
    """One executable copy of a model, owned by one instance."""

    # Whether :meth:`launch` may start executions without waiting for them. Such an
    # engine's executions are gathered and launched on the event loop's thread, which then
    # learns of their end from the waker (or polls), instead of going to the instance
    # thread and back.
    launches: bool = False
    # Whether :meth:`gather` reads inputs still in shared-memory regions straight into
    # buffers of its own. Where it does not, the scheduler reads them into arrays when a
    # request arrives, on the event loop, beside the instance threads, as any input arrives.
    reads_regions: bool = False
    # Whether the engine may write an output into a mapped region itself, as :meth:`gather`'s
    # ``output_targets`` offer (``HostOutput``). Where none of a model's engines can, the
    # data plane does not make such targets for its requests.
    writes_host_outputs: bool = False

    def launch(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> Launched | None:
        """Start an execution and return without waiting for it, or None when this one
        cannot be (it then runs through :meth:`execute` on the instance thread)."""
        return None

    @abstractmethod
    def execute(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        """Run the model on named inputs and return the named outputs, in that order."""

    def gather(
        self, parts: dict[str, list[Tensor]], output_targets: OutputTargets | None = None
    ) -> dict[str, np.ndarray]:
        """The inputs of one execution from the requests' inputs, stacked along the batch
        dimension in order (a tensor still in a shared-memory region is read here). Engines
        that stage inputs in buffers of their own override it to copy each part into place
        once, instead of joining them first. ``output_targets``: where the execution that
        follows may write requests' outputs itself (on a device, or in a mapped region); an
        engine that cannot leaves them (the data plane then writes those outputs)."""
        return {
            name: np.asarray(arrays[0]) if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            for name, arrays in parts.items()
        }

    def cancel(self) -> None:  # noqa: B027 - a runtime that cannot stop a run does nothing
        """Ask the execution in progress to stop, from another thread; best effort. Called
        when an execution outlives the model's timeout: the instance is replaced either way,
        and an engine that stops frees its thread and memory sooner."""

    def close(self) -> None:  # noqa: B027 - engines without resources need not override
        """Release what the engine holds (sessions, device memory)."""


class SourceFacts(Protocol):
    """What a backend may ask of the engine cache's memory of source files: facts computed
    once per file content and remembered across starts (the builder's SourceFacts)."""

    def signature(self, path: Path) -> Any: ...

    def remembered(self, path: Path, name: str, compute: Callable[[Path], Any]) -> Any: ...


class Backend(ABC):
    """A runtime that turns a model file into engines."""

    name: str
    platform: str
    # The model file names looked for in a version folder when the config names none, in
    # order of preference; the first is what Triton's backend of the same name uses.
    default_filenames: tuple[str, ...]

    def model_file(self, version_dir: Path, configured: str = "") -> Path:
        """The model file of a version: the config's ``default_model_filename``, else the
        first default name present, else the first default name (reported missing later)."""
        if configured:
            return version_dir / configured
        for name in self.default_filenames:
            if (version_dir / name).exists():
                return version_dir / name
        return version_dir / self.default_filenames[0]

    @abstractmethod
    def complete_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> mc.ModelConfig:
        """Fill what the config leaves out from the model file (non-strict mode), whose
        signature the caller may already know."""

    def remembered_signature(
        self, config: mc.ModelConfig, model_file: Path, facts: SourceFacts
    ) -> object | None:
        """What :meth:`check_config` would read from the model file, from ``facts`` (reading
        a big file takes a large share of a warm start, or seconds); None when the backend
        reads nothing worth remembering. ONNX files are described by their graph signature."""
        if model_file.suffix == ".onnx":
            return facts.signature(model_file)
        return None

    @abstractmethod
    def check_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> None:
        """Raise ModelLoadError if the config does not describe the model file (whose
        signature the caller may already know)."""

    @abstractmethod
    def has_gpu(self) -> bool:
        """Whether this backend can place instances on a GPU here."""

    def gpu_count(self) -> int:
        """The GPUs this process sees (after ``CUDA_VISIBLE_DEVICES``), numbered from 0 as
        ``instance_group.gpus`` names them: a GPU group that lists none is placed on each."""
        return 1 if self.has_gpu() else 0

    def free_device_memory(self, placement: Placement) -> int | None:
        """Bytes free on the placement's device, or None where that is not known (CPU)."""
        return None

    @abstractmethod
    def load(
        self,
        config: mc.ModelConfig,
        model_file: Path,
        placement: Placement,
        optimized: bool = False,
    ) -> Engine:
        """A new engine for one instance; ``optimized`` files were optimised when built."""
