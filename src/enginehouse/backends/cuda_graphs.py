"""A GPU instance's engine: CUDA graphs per batch bucket, static buffers, pinned staging.

Launching a compiled model kernel by kernel costs tens of microseconds of CPU per layer;
replaying a captured CUDA graph costs one launch. So a GPU instance captures one graph per
batch bucket while it loads (before the version is ready). A request batch is gathered
into page-locked host buffers and padded up to the nearest bucket; one graph launch then
copies it host->device, runs the model and copies the outputs back, on the instance's own
stream. Each instance has its own stream, so one instance's copies overlap another's
compute.

Served executions never go to the instance's thread (:meth:`CudaGraphEngine.launch`): the
event loop's thread gathers the batch, launches the graph and records an event, then goes
on serving until the stream's waker (stream_wake.py) says the launch has ended. Every hand-off
between threads costs a wait for the GIL, up to the 5 ms switch interval while the loop is
busy. On the instance thread an execution took four (waking up, after the launch, after the
event was recorded, after it was waited for): near saturation BERT-base's batches took 12 ms
in the server against 4 ms raw, and throughput collapsed to a third. One launch rather than
one per copy for the same reason: with separate copy launches the GPU sat idle between them
and batches took twice as long on its own clock.

Inputs in a client's CUDA shared-memory region on the instance's device never cross to the
host: the gather leaves them where they are, and the launch copies them device to device into
the static input buffers, copies the batch's other rows there from the staging buffers, and
replays the bucket's second graph, captured beside the first: the model and the output copies
without the input copies (:meth:`CudaGraphEngine._feed_on_device`). So does a large batch from
the host: the gather sends each of a few row ranges to the device once it is staged, and the
copy, slow beside another instance's model, ends with the gather, not after. Inputs in pinned
system regions take the same way, by DMA from the client's pages: no CPU copies them. Outputs
bound for a CUDA region on the device are copied there from the graph's own output buffers,
device to device, on the same stream before the launch's done event
(:meth:`CudaGraphEngine._write_on_device`).

An engine whose program casts its floating inputs to fp16 first (``half_inputs``: an fp16
engine from the builder) stages FP32 inputs as FP16: the gather converts them into the
page-locked buffers (host_copies.py), the graph copies half the bytes to the device into a
landing buffer and widens them there into the static FP32 input, which the program then
narrows again, exactly: the values are those the program's own cast would have made. An FP32
input in a region is copied to the static buffer as it is.

Synchronous executions (warm-up, benchmarks: :meth:`CudaGraphEngine.execute`) wait on the
blocking event on the calling thread. Shapes that no graph covers (a variable non-batch
dimension, or graphs turned off) run the model directly on the instance's stream, on the
instance's thread.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.backends.base import Engine, Launched
from enginehouse.backends.graph_setup import (
    CUBLAS_CACHE_LOCK,
    SETUP_LOCK,
    captured_cublas_workspace,
    give_back_stream,
    input_specs,
    take_stream,
)
from enginehouse.backends.host_copies import (
    HALF_STAGING,
    copied,
    copy_all,
    copy_in_row_ranges,
    copy_rows,
)
from enginehouse.backends.page_locked import PageLocked
from enginehouse.backends.stream_wake import StreamWaker, stream_waker
from enginehouse.messages import (
    ANY_DEVICE,
    DeviceOutput,
    OutputTargets,
    RegionTensor,
    Tensor,
)

log = logging.getLogger(__name__)

WARM_RUNS = 3
# A synchronous execution wakes this long before its expected end and then checks its done
# event, for at most SPIN_S past that end (see CudaGraphEngine._wait).
SPIN_EARLY_S = 0.0002
SPIN_S = 0.0005


class CudaGraphEngine(Engine):
    """Runs ``run`` (positional CUDA tensors in, tensors out) on one device and stream."""

    def __init__(
        self,
        torch: Any,
        run: Callable[..., Any],
        config: mc.ModelConfig,
        device: str,
        buckets: Sequence[int],
        half_inputs: bool = False,
    ) -> None:
        self._torch = torch
        self._run = run
        self.config = config
        self.device = torch.device(device)
        self.stream = take_stream(torch, self.device)
        # Executions wait on a blocking event: the thread sleeps until the copies are done.
        # A stream synchronize spins a core per instance for the whole execution, which on a
        # server takes CPU from the frontends (BERT at 8k req/s: 0.3 cores for two instances
        # instead of 0.75, and a lower p99).
        self._done = torch.cuda.Event(blocking=True)
        self._inputs = [t.name for t in config.input]
        self._index = {t.name: i for i, t in enumerate(config.output)}
        specs = input_specs(torch, config)
        self._dims = [dims for dims, _ in specs]
        self._dtypes = [dtype for _, dtype in specs]
        self._wire_dtypes = [np.dtype(datatypes.BY_CONFIG[t.data_type].numpy) for t in config.input]
        # What each input is staged as on the host: FP16 for an FP32 input of a program that
        # narrows it to fp16 first anyway, else its own dtype.
        half = half_inputs and HALF_STAGING
        self._staged_dtypes = [
            torch.float16 if half and dtype == torch.float32 else dtype for dtype in self._dtypes
        ]
        fixed = config.max_batch_size > 0 and all(d > 0 for dims in self._dims for d in dims)
        self.buckets = sorted(set(buckets)) if fixed else []
        self.launches = bool(self.buckets)
        self.reads_regions = bool(self.buckets)
        # Tells the event loop when a launch has ended (None: the loop polls).
        self.waker: StreamWaker | None = None
        # Per bucket: seconds from launch to done, as last seen (see GraphLaunch.outputs).
        self.took: dict[int, float] = {}
        # Per bucket: the copy from the pinned inputs, the model, the copy to the pinned
        # outputs, in one graph.
        self._graphs: dict[int, Any] = {}
        # Per bucket: the model and the copy to the pinned outputs, for batches whose inputs
        # are already in the static buffers (fed on the device).
        self._fed_graphs: dict[int, Any] = {}
        # Set by gather() for the launch that follows it: the inputs it left in CUDA regions
        # on this device or in page-locked ones, as (input index, first row, tensor).
        self._on_device: list[tuple[int, int, RegionTensor]] = []
        # Set by gather() for the launch: the rows it sent to the device range by range.
        self._sent_rows = 0
        self.device_fed_batches = self.ranged_batches = 0
        # Per bucket and graph (fed from staging, fed on the device): each of the model's
        # outputs on the device as (address, bytes per row), where outputs bound for CUDA
        # regions are copied from; None for one that is not a single contiguous buffer.
        # Known at capture; the tensors stay held so that no later capture reuses them.
        self._output_places: dict[tuple[int, bool], list[tuple[int, int] | None]] = {}
        self._held_outputs: list[Any] = []
        # Set by gather() for the launch that follows it: outputs to write on this device,
        # as (output index, first row, rows, target).
        self._out_on_device: list[tuple[int, int, int, DeviceOutput]] = []
        self.device_written_outputs = 0
        index = self.device.index
        self._device_index = torch.cuda.current_device() if index is None else index
        # The devices whose region tensors the launch copies in itself: this one's (CUDA
        # regions on it) and any (page-locked system regions, by DMA).
        self._copied_in = (self._device_index, ANY_DEVICE)
        # Per bucket, captured on first use by replay(): the model alone (benchmarks).
        self._bare: dict[int, Any] = {}
        self._pool: Any = None
        self._pinned_in: list[Any] = []
        self._pinned_out: list[Any] = []
        self._locked = PageLocked(torch)
        # NumPy views of the pinned buffers, made once: requests copy into and out of them.
        self._host_in: list[np.ndarray] = []
        self._host_out: list[np.ndarray] = []
        self._static_in: list[Any] = []
        # Per input, the device buffer its narrower staging lands in before being widened
        # into the static buffer; None where it is staged as it is.
        self._landing: list[Any] = []
        # Called once the engine is closed (releases a module shared with other instances).
        self.on_close: Callable[[], None] | None = None
        if self.buckets:
            try:
                self._capture()
                self.waker = stream_waker(self.stream.cuda_stream)
            except BaseException:
                # Page-locked memory would outlive the engine; no copy may still be using it.
                with contextlib.suppress(Exception):
                    self.stream.synchronize()
                self._locked.release()
                raise

    def _capture(self) -> None:
        """Capture every bucket's two graphs (fed from the staging buffers, and fed on the
        device), largest bucket first, sharing one memory pool."""
        torch = self._torch
        started = time.perf_counter()
        largest = self.buckets[-1]
        self._static_in = [
            torch.zeros((largest, *dims), dtype=dtype, device=self.device)
            for dims, dtype in zip(self._dims, self._dtypes)
        ]
        self._pinned_in = [
            self._locked.pin((largest, *dims), staged)
            for dims, staged in zip(self._dims, self._staged_dtypes)
        ]
        self._landing = [
            None
            if staged == dtype
            else torch.empty((largest, *dims), dtype=staged, device=self.device)
            for dims, dtype, staged in zip(self._dims, self._dtypes, self._staged_dtypes)
        ]
        if any(landing is not None for landing in self._landing):
            log.info(
                "model '%s': FP32 inputs staged as FP16 (the program narrows them first)",
                self.config.name,
            )
        self._pool = torch.cuda.graph_pool_handle()
        warming = 0.0
        with SETUP_LOCK, torch.inference_mode(), torch.cuda.device(self.device):
            for size in reversed(self.buckets):
                views = [t[:size] for t in self._static_in]
                began = time.perf_counter()
                with torch.cuda.stream(self.stream):
                    for _ in range(WARM_RUNS):
                        warm = self._as_tuple(self._run(*views))
                self.stream.synchronize()
                warming += time.perf_counter() - began
                if not self._pinned_out:  # the largest bucket comes first
                    self._pinned_out = [self._locked.pin(tuple(t.shape), t.dtype) for t in warm]
                del warm
                served, results = self._graph(size, from_staging=True, to_staging=True)
                self._keep_outputs((size, True), results)
                fed, results = self._graph(size, from_staging=False, to_staging=True)
                self._keep_outputs((size, False), results)
                # The first launch of a graph uploads it to the device: do it now, not in
                # the first request that this bucket serves.
                served.replay()
                fed.replay()
                self._graphs[size] = served
                self._fed_graphs[size] = fed
                log.debug(
                    "model '%s': batch %d warmed and captured on %s (%.3f s into the capture)",
                    self.config.name,
                    size,
                    self.device,
                    time.perf_counter() - started,
                )
            self.stream.synchronize()
        self._host_in = [t.numpy() for t in self._pinned_in]
        self._host_out = [t.numpy() for t in self._pinned_out]
        log.info(
            "model '%s': CUDA graphs for %d batch sizes captured on %s in %.2f s (%.2f s of "
            "warm-up runs; batch %s)",
            self.config.name,
            len(self._graphs),
            self.device,
            time.perf_counter() - started,
            warming,
            ",".join(map(str, self.buckets)),
        )

    def _graph(
        self, size: int, from_staging: bool, to_staging: bool
    ) -> tuple[Any, tuple[Any, ...]]:
        """One bucket's graph and its outputs on the device: the model on the static input
        buffers, with the copy from the pinned inputs before it and the copy to the pinned
        outputs after it where asked. Every graph of the engine shares one memory pool; the
        caller holds SETUP_LOCK."""
        torch = self._torch
        graph = torch.cuda.CUDAGraph()
        # Thread-local capture: other instances keep serving on their own threads.
        with (
            captured_cublas_workspace(torch),
            torch.cuda.graph(
                graph, pool=self._pool, stream=self.stream, capture_error_mode="thread_local"
            ),
        ):
            if from_staging:
                for index in range(len(self._static_in)):
                    self._from_staging(index, 0, size)
            results = self._as_tuple(self._run(*(t[:size] for t in self._static_in)))
            if to_staging:
                for pinned, result in zip(self._pinned_out, results):
                    pinned[:size].copy_(result, non_blocking=True)
        return graph, results

    def _from_staging(self, index: int, start: int, stop: int) -> None:
        """Enqueue rows ``start:stop`` of input ``index`` from its page-locked staging buffer
        into its static device buffer, on the current stream: through the landing buffer,
        and widened there, where the input is staged narrower."""
        static, pinned, landing = (
            self._static_in[index],
            self._pinned_in[index],
            self._landing[index],
        )
        if landing is None:
            static[start:stop].copy_(pinned[start:stop], non_blocking=True)
        else:
            landing[start:stop].copy_(pinned[start:stop], non_blocking=True)
            static[start:stop].copy_(landing[start:stop])

    def _keep_outputs(self, key: tuple[int, bool], results: tuple[Any, ...]) -> None:
        """Hold a graph's output tensors and note where each lies, once, at capture: a
        launch that writes outputs on the device then asks torch nothing."""
        self._held_outputs.extend(results)
        self._output_places[key] = [
            (r.data_ptr(), r.numel() // max(1, r.shape[0]) * r.element_size())
            if r.is_contiguous()
            else None
            for r in results
        ]

    def _as_tuple(self, result: Any) -> tuple[Any, ...]:
        return (result,) if isinstance(result, self._torch.Tensor) else tuple(result)

    def bucket(self, rows: int) -> int | None:
        """The smallest captured batch size that holds ``rows``."""
        at = bisect.bisect_left(self.buckets, rows)
        return self.buckets[at] if at < len(self.buckets) else None

    def gather(
        self, parts: dict[str, list[Tensor]], output_targets: OutputTargets | None = None
    ) -> dict[str, np.ndarray]:
        """Requests' inputs copied straight into the pinned staging buffers (one copy, not a
        join and then a copy; an input in a shared-memory region is read from the region
        into place), when the batch fits a captured graph. ``execute`` then finds them in
        place and copies nothing. Parts in CUDA regions on this device, and in page-locked
        system regions, are left there for the launch to copy to the device, and so are
        outputs bound for CUDA regions (``output_targets``, one entry per part of the first
        input)."""
        self._on_device = []
        self._out_on_device = []
        self._sent_rows = 0
        lists = [parts.get(name, []) for name in self._inputs]
        rows = self._stageable_rows(lists)
        if not rows:
            return super().gather(parts)
        staged = {}
        copies: list[tuple[int, np.ndarray, Tensor]] = []
        on_device = []
        for index, (name, arrays, host) in enumerate(zip(self._inputs, lists, self._host_in)):
            offset = 0
            for array in arrays:
                end = offset + array.shape[0]
                if isinstance(array, RegionTensor) and array.device in self._copied_in:
                    on_device.append((index, offset, array))
                else:
                    copies.append((offset, host[offset:end], array))
                offset = end
            staged[name] = host[:rows]
        if not on_device and copy_in_row_ranges(copies, rows, self._send_rows):
            self._sent_rows = rows
        else:
            copy_all([(destination, source) for _, destination, source in copies])
        self._on_device = on_device
        if output_targets:
            self._out_on_device = self._outputs_here(lists[0], output_targets)
        return staged

    def _send_rows(self, start: int, stop: int) -> None:
        """Enqueue rows ``start:stop`` of every input from staging to the static buffers."""
        with self._torch.cuda.stream(self.stream):
            for index in range(len(self._static_in)):
                self._from_staging(index, start, stop)

    def _outputs_here(
        self, firsts: list[Tensor], output_targets: OutputTargets
    ) -> list[tuple[int, int, int, DeviceOutput]]:
        """The targets on this engine's device, with the rows of the batch each takes."""
        found = []
        for name, targets in output_targets.items():
            index = self._index.get(name)
            if index is None or len(targets) != len(firsts):
                continue
            first = 0
            for part, target in zip(firsts, targets):
                if isinstance(target, DeviceOutput) and target.device == self._device_index:
                    found.append((index, first, part.shape[0], target))
                first += part.shape[0]
        return found

    def _stageable_rows(self, lists: list[list[Tensor]]) -> int:
        """The rows these parts fill in the staging buffers, or 0 when they do not fit a
        captured graph as it expects (they then take the direct, uncaptured path)."""
        if not lists or len(lists) != len(self._host_in):
            return 0
        rows = 0
        for index, (arrays, dims, wire) in enumerate(zip(lists, self._dims, self._wire_dtypes)):
            if not arrays or any(a.ndim == 0 for a in arrays):
                return 0
            if any(a.shape[1:] != dims or a.dtype != wire for a in arrays):
                return 0
            total = sum(a.shape[0] for a in arrays)
            if index and total != rows:
                return 0
            rows = total
        return rows if self.bucket(rows) is not None else 0

    def launch(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> GraphLaunch | None:
        """Stage the inputs (unless gather() did), launch the bucket's graph, record the
        done event and arm the waker; None when no captured graph fits these shapes."""
        launched = self._start(inputs, output_names)
        if launched is not None and self.waker is not None:
            launched.waker = self.waker
            launched.ticket = self.waker.arm()
        return launched

    def _start(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> GraphLaunch | None:
        # What gather() left for this launch, taken either way: a region stays held only
        # while its launch needs it.
        on_device, self._on_device = self._on_device, []
        out_on_device, self._out_on_device = self._out_on_device, []
        sent_rows, self._sent_rows = self._sent_rows, 0
        arrays = [inputs[name] for name in self._inputs]
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
        size = self.bucket(rows) if self.buckets else None
        if size is None or any(a.shape[1:] != dims for a, dims in zip(arrays, self._dims)):
            return None
        if self._run is None:
            raise RuntimeError(f"model '{self.config.name}': the engine is closed")
        torch = self._torch
        staged = True
        for array, host in zip(arrays, self._host_in):
            if not np.may_share_memory(array, host):  # gather() did not stage it already
                copy_rows(host[:rows], array)
                staged = False
        started = time.perf_counter()
        with torch.cuda.stream(self.stream):
            fed = (bool(on_device) or sent_rows == rows) and staged
            if fed:
                if on_device:
                    self._feed_on_device(on_device, rows)
                self.device_fed_batches += bool(on_device)
                self.ranged_batches += not on_device
                self._fed_graphs[size].replay()
            else:
                self._graphs[size].replay()
            if out_on_device:
                self._write_on_device(self._output_places[size, not fed], out_on_device)
            self._done.record(self.stream)
        return GraphLaunch(self, size, rows, [self._index[n] for n in output_names], started)

    def _feed_on_device(self, on_device: list[tuple[int, int, RegionTensor]], rows: int) -> None:
        """Fill the static input buffers for ``rows`` (on the instance's stream, which is
        current): the parts in CUDA regions device to device, the rest of each input's rows
        from the staging buffers in runs between them."""
        stream = int(self.stream.cuda_stream)
        by_input: dict[int, list[tuple[int, RegionTensor]]] = {}
        for index, first, tensor in on_device:
            by_input.setdefault(index, []).append((first, tensor))
        for index, static in enumerate(self._static_in):
            row_bytes = static.stride(0) * static.element_size()
            address = static.data_ptr()
            copied_to = 0
            for first, tensor in sorted(by_input.get(index, []), key=lambda part: part[0]):
                if first > copied_to:
                    self._from_staging(index, copied_to, first)
                tensor.copy_to_device(address + first * row_bytes, stream)
                copied_to = first + tensor.shape[0]
            if copied_to < rows:
                self._from_staging(index, copied_to, rows)

    def _write_on_device(
        self,
        places: list[tuple[int, int] | None],
        targets: list[tuple[int, int, int, DeviceOutput]],
    ) -> None:
        """Enqueue, on the instance's stream (current), the copy of each target's rows of
        the graph's outputs into its CUDA region. A target left unwritten (an output that is
        not one contiguous buffer, rows that do not fit it) is written from the host
        instead, by the data plane, which also reports why it does not fit."""
        stream = int(self.stream.cuda_stream)
        for index, first, rows, target in targets:
            place = places[index]
            if place is None:
                continue
            address, row_bytes = place
            if target.copy_from_device(address + first * row_bytes, rows * row_bytes, stream):
                self.device_written_outputs += 1

    def execute(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        launched = self._start(inputs, output_names)  # waited for here: no wake-up
        if launched is None:
            arrays = [inputs[name] for name in self._inputs]
            return self._execute_direct(arrays, output_names)
        self._wait(launched.expected_at)
        return launched.outputs()

    def _wait(self, expected_at: float) -> None:
        """Wait for the done event: asleep until shortly before the launch is expected to
        end, then checking the event, then blocked on it. A blocking event's wake-up costs
        about 0.1 ms, a quarter of ResNet-50's whole replay at batch 1. The checks yield the
        GIL between them and stop SPIN_S after the expected end, so a launch that ends late
        costs a core for no longer than that; one whose time is not known yet blocks."""
        done = self._done
        if expected_at <= 0.0:
            done.synchronize()
            return
        lead = expected_at - SPIN_EARLY_S - time.perf_counter()
        if lead > 0.0:
            time.sleep(lead)
        give_up = max(time.perf_counter(), expected_at) + SPIN_S
        while not done.query():
            if time.perf_counter() > give_up:
                done.synchronize()
                return
            time.sleep(0)

    def replay(self, rows: int) -> None:
        """Replay the model alone for ``rows`` on the data already in the static buffers,
        without copies or synchronisation: the raw engine, for benchmarks. Its graph is
        captured on the first call for that bucket, so that serving never pays for it."""
        size = self.bucket(rows)
        if size is None:
            raise ValueError(f"no CUDA graph holds {rows} rows (buckets {self.buckets})")
        torch = self._torch
        graph = self._bare.get(size)
        if graph is None:
            with SETUP_LOCK, torch.inference_mode(), torch.cuda.device(self.device):
                graph, _ = self._graph(size, from_staging=False, to_staging=False)
                self._bare[size] = graph
        with torch.cuda.stream(self.stream):
            graph.replay()

    def _execute_direct(
        self, arrays: list[np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        torch = self._torch
        with CUBLAS_CACHE_LOCK, torch.inference_mode(), torch.cuda.stream(self.stream):
            tensors = [
                torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)
                for a in arrays
            ]
            results = self._as_tuple(self._run(*tensors))
            host = [results[self._index[n]].to("cpu", non_blocking=True) for n in output_names]
            self._done.record(self.stream)
        self._done.synchronize()
        return [t.numpy() for t in host]

    def close(self) -> None:
        """Drop graphs, buffers and the model; the allocator's cache is emptied by the server."""
        if self._run is None:
            return
        self.stream.synchronize()
        self._graphs.clear()
        self._fed_graphs.clear()
        self._output_places.clear()
        self._held_outputs.clear()
        self._bare.clear()
        self._static_in.clear()
        self._landing.clear()
        self._pinned_in.clear()
        self._pinned_out.clear()
        self._host_in.clear()
        self._host_out.clear()
        self._locked.release()
        if self.waker is not None:
            self.waker.close()
            self.waker = None
        self._run = None  # type: ignore[assignment]
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        give_back_stream(self.device, self.stream)


class GraphLaunch(Launched):
    """One launched graph replay of a :class:`CudaGraphEngine`; its outputs wait in the
    engine's pinned buffers, which the engine's next launch overwrites, so the instance
    takes them (:meth:`outputs`) before it runs again."""

    def __init__(
        self, engine: CudaGraphEngine, size: int, rows: int, picks: list[int], started: float
    ) -> None:
        self._engine = engine
        self._size = size
        self._rows = rows
        self._picks = picks
        self._started = started
        took = engine.took.get(size)
        self.expected_at = 0.0 if took is None else started + took  # 0: not known yet

    def done(self) -> bool:
        return bool(self._engine._done.query())

    def outputs(self) -> list[np.ndarray]:
        engine = self._engine
        took = time.perf_counter() - self._started
        # Falls at once, rises slowly: the time seen includes how late the check came, and
        # the instance sleeps until shortly before the expected time.
        known = engine.took.get(self._size)
        if known is not None and took > known:
            took = known * 0.9 + took * 0.1
        engine.took[self._size] = took
        if not engine._host_out:
            raise RuntimeError(f"model '{engine.config.name}': the engine was closed")
        return [copied(engine._host_out[i][: self._rows]) for i in self._picks]
