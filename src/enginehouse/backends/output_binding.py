"""ONNX Runtime writing a request's outputs straight into memory the request gave.

An output bound for a mapped shared-memory region used to be computed into memory of ONNX
Runtime's and then copied into the region: for a 1 MB output that copy was 13% of the event
loop's samples serving it on the 2-core machine. ONNX Runtime's I/O binding lets a run write
an output into a buffer given to it, of the exact shape it computes. The shape must be known
before the run: the config's dims (the engine's, after any ``reshape``) with the request's
rows in front where the model batches. An output with a variable dim, or of strings, is not
bound, nor one whose target overlaps an input or another output (a run reads its inputs
while it writes), and then neither are the request's others (one plain run serves them all).

Binding costs about 7 us a run on that machine, against the copy it saves (30 us for 1 MB
from cache): the data plane offers only outputs of at least 128 KiB
(``core/shared_memory.py``'s ``IN_PLACE_OUTPUT_BYTES``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.messages import HostOutput

# ONNX Runtime's CPU kernels are vectorised; a buffer of its allocator's alignment is what
# they are written for.
ALIGNMENT = 64


class OutputBinding:
    """The shapes and types a model's outputs have before a run, and the bound run itself."""

    def __init__(
        self, session: Any, outputs: Mapping[str, tuple[tuple[int, ...], np.dtype]], batching: bool
    ) -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as native

        self._session = session._sess  # the native session, as OnnxRuntimeEngine runs it
        self._new_binding = native.SessionIOBinding
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._outputs = dict(outputs)
        self._batching = batching

    @classmethod
    def of(cls, config: mc.ModelConfig, session: Any) -> OutputBinding | None:
        """The binding of a CPU session's outputs whose shapes the config fixes; None where
        none does."""
        outputs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for tensor in config.output:
            dims = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else tuple(tensor.dims)
            kind = datatypes.BY_CONFIG.get(tensor.data_type)
            if kind is None or kind.name == "BYTES" or any(d < 0 for d in dims):
                continue
            outputs[tensor.name] = (dims, np.dtype(kind.numpy))
        return cls(session, outputs, config.max_batch_size > 0) if outputs else None

    def outputs_in(
        self,
        inputs: Mapping[str, np.ndarray],
        names: Sequence[str],
        targets: Mapping[str, HostOutput],
    ) -> list[tuple[np.ndarray, int]] | None:
        """Each output as an array over its target, of the shape the run will compute, and
        its address; None unless every one of ``names`` can be so written."""
        rows = -1
        if self._batching:
            first = next(iter(inputs.values()), None)
            if first is None or first.ndim == 0:
                return None
            rows = first.shape[0]
        if not all(a.flags.c_contiguous for a in inputs.values()):
            return None
        arrays: list[tuple[np.ndarray, int]] = []
        for name in names:
            spec, target = self._outputs.get(name), targets.get(name)
            if spec is None or target is None:
                return None
            dims, dtype = spec
            shape = (rows, *dims) if self._batching else dims
            size = math.prod(shape) * dtype.itemsize
            buffer = target.buffer
            address = buffer.ctypes.data
            if size > buffer.nbytes or address % ALIGNMENT:
                return None
            array = buffer[:size].view(dtype).reshape(shape)
            # A run reads its inputs while it writes its outputs: no output may lie over an
            # input (a client may name one region for both) or over another output.
            if any(np.may_share_memory(array, a) for a in inputs.values()) or any(
                np.may_share_memory(array, other) for other, _ in arrays
            ):
                return None
            arrays.append((array, address))
        return arrays

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        names: Sequence[str],
        outputs: Sequence[tuple[np.ndarray, int]],
        options: Any,
    ) -> None:
        """One run of the session with ``inputs`` read in place and each output written
        into its array of ``outputs`` (as :meth:`outputs_in` gave them)."""
        binding = self._new_binding(self._session)
        for name, array in inputs.items():
            binding.bind_input(name, array)
        for name, (array, address) in zip(names, outputs):
            binding.bind_output(name, self._cpu, array.dtype, list(array.shape), address)
        self._session.run_with_iobinding(binding, options)
