"""An execution instance: one engine and the thread that runs it.

Kernels run on the instance's own thread, so the event loop keeps serving and several
instances run in parallel outside the GIL (ONNX Runtime and PyTorch release it). The
instance measures the three compute phases Triton reports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from enginehouse.backends.base import Engine, Placement


@dataclass(slots=True)
class Execution:
    """The outputs of one execution and how long each phase took (ns)."""

    outputs: list[np.ndarray]
    input_ns: int
    infer_ns: int
    output_ns: int


PrepareInputs = Callable[[], dict[str, np.ndarray]]
FinishOutputs = Callable[[list[np.ndarray]], list[np.ndarray]]


class Instance:
    """One engine bound to one thread; used by one execution at a time."""

    def __init__(self, name: str, engine: Engine, placement: Placement) -> None:
        self.name = name
        self.placement = placement
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def _run(
        self, prepare: PrepareInputs, output_names: Sequence[str], finish: FinishOutputs
    ) -> Execution:
        clock = time.perf_counter_ns
        t0 = clock()
        inputs = prepare()
        t1 = clock()
        outputs = self._engine.execute(inputs, output_names)
        t2 = clock()
        outputs = finish(outputs)
        t3 = clock()
        return Execution(outputs, t1 - t0, t2 - t1, t3 - t2)

    def execute_sync(
        self, prepare: PrepareInputs, output_names: Sequence[str], finish: FinishOutputs
    ) -> Execution:
        """Run on the calling thread (warm-up, tests)."""
        return self._run(prepare, output_names, finish)

    def execute(
        self, prepare: PrepareInputs, output_names: Sequence[str], finish: FinishOutputs
    ) -> asyncio.Future[Execution]:
        """Run on the instance thread; the future resolves on the caller's event loop."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._run, prepare, output_names, finish)

    def close(self) -> None:
        """Finish the running execution, then release the engine."""
        self._executor.shutdown(wait=True)
        self._engine.close()
