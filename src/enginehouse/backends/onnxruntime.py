"""The ONNX Runtime backend: the embedded default, on every machine.

Each instance gets its own ``InferenceSession``. Sessions are built with full graph
optimisation and, by default, without spinning worker threads: spinning buys microseconds
on an idle machine and steals the frontends' cores on a loaded one. Triton's ORT backend
parameters ``intra_op_thread_count``, ``inter_op_thread_count`` and
``enable_spinning`` (an enginehouse key) tune that per model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends.base import Backend, Engine, Placement, SourceFacts
from enginehouse.backends.output_binding import OutputBinding
from enginehouse.config import autocomplete
from enginehouse.config.model_config import ONNX_BACKEND, ONNX_PLATFORM, parameter
from enginehouse.errors import InvalidArgumentError, ModelLoadError
from enginehouse.messages import HostOutput, OutputTargets, Tensor

log = logging.getLogger(__name__)


def _to_text(array: np.ndarray, name: str) -> np.ndarray:
    """ORT's Python API takes string tensors as ``str`` objects; BYTES arrive as bytes."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.object_)
    try:
        for i, item in enumerate(flat):
            out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise InvalidArgumentError(
            f"input '{name}': BYTES element {i} is not UTF-8; ONNX string tensors hold text"
        ) from None
    return out.reshape(array.shape)


def _to_bytes(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.object_)
    for i, item in enumerate(flat):
        out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out.reshape(array.shape)


class OnnxRuntimeEngine(Engine):
    """An ONNX Runtime session and the knowledge of which tensors are strings. Where the
    request's outputs all go into mapped shared-memory regions (``HostOutput`` targets, set
    by :meth:`gather` for the execution that follows it), ONNX Runtime writes them there
    itself (:class:`~enginehouse.backends.output_binding.OutputBinding`)."""

    def __init__(
        self,
        session: object,
        string_inputs: frozenset[str],
        binding: OutputBinding | None = None,
    ) -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as native

        self._session = session
        self._string_inputs = string_inputs
        # String outputs come back as arrays of str; nothing else needs a look.
        self._string_outputs = any(
            o.type == "tensor(string)"
            for o in session.get_outputs()  # type: ignore[attr-defined]
        )
        # InferenceSession.run checks the feed's names and the graph-capture setting on
        # every call, then calls the native session: 5.6 of the 18.6 us a run of `simple`
        # takes on the 2-core machine. The core has checked the names already. A failure of
        # the execution provider still goes through run(), which falls back.
        native_session: Any = getattr(session, "_sess", session)
        self._run: Callable[..., Any] = native_session.run
        # Caught to fall back; an ONNX Runtime without the type catches nothing (``()``).
        self._ep_failure: type[BaseException] | tuple[()] = getattr(native, "EPFail", ())
        self._new_run_options = ort.RunOptions
        # Set to terminate by cancel(); replaced after a terminated run.
        self._run_options = ort.RunOptions()
        self._cancelled = False
        self._binding = binding if not string_inputs else None
        self.writes_host_outputs = self._binding is not None
        # Set by gather() for the execute() that follows it: (its inputs, their targets).
        self._targets: tuple[dict[str, np.ndarray], dict[str, HostOutput]] | None = None

    def gather(
        self, parts: dict[str, list[Tensor]], output_targets: OutputTargets | None = None
    ) -> dict[str, np.ndarray]:
        inputs = super().gather(parts)
        if output_targets and self._binding is not None:
            # One request's outputs only: a batch's rows of one output go to several places.
            host = {
                name: targets[0]
                for name, targets in output_targets.items()
                if len(targets) == 1 and isinstance(targets[0], HostOutput)
            }
            self._targets = (inputs, host) if host else None
        return inputs

    def execute(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        targets, self._targets = self._targets, None
        if targets is not None and targets[0] is inputs and self._binding is not None:
            written = self._execute_into(inputs, output_names, targets[1], self._binding)
            if written is not None:
                return written
        if self._string_inputs:
            inputs = {
                name: _to_text(value, name) if name in self._string_inputs else value
                for name, value in inputs.items()
            }
        options = self._run_options
        names = list(output_names)
        try:
            results = self._run(names, inputs, options)
        except self._ep_failure:
            results = self._session.run(names, inputs, options)  # type: ignore[attr-defined]
        finally:
            if self._cancelled:
                self._cancelled = False
                self._run_options = self._new_run_options()
        if not self._string_outputs:
            return results  # type: ignore[no-any-return]
        return [
            _to_bytes(r) if isinstance(r, np.ndarray) and r.dtype == np.object_ else r
            for r in results
        ]

    def _execute_into(
        self,
        inputs: dict[str, np.ndarray],
        output_names: Sequence[str],
        targets: dict[str, HostOutput],
        binding: OutputBinding,
    ) -> list[np.ndarray] | None:
        """Run with the outputs written into their targets; None where they cannot be (the
        plain run then follows)."""
        outputs = binding.outputs_in(inputs, output_names, targets)
        if outputs is None:
            return None
        try:
            binding.run(inputs, output_names, outputs, self._run_options)
        except Exception as exc:
            if self._cancelled:
                raise
            # The config's output shapes are not what the model computes, or the model
            # fails on these inputs: the plain run follows, and says which.
            log.warning(
                "outputs in place turned off for this instance: a run with its outputs bound "
                "failed (%s); it is run again without",
                exc,
            )
            self._binding = None
            return None
        finally:
            if self._cancelled:
                self._cancelled = False
                self._run_options = self._new_run_options()
        for name, (array, _) in zip(output_names, outputs):
            targets[name].written = array.nbytes
        return [array for array, _ in outputs]

    def cancel(self) -> None:
        """ONNX Runtime checks the flag between kernels and in loops, and the run ends."""
        self._cancelled = True
        self._run_options.terminate = True

    def close(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    """Loads ``model.onnx`` files into ONNX Runtime sessions."""

    name = ONNX_BACKEND
    platform = ONNX_PLATFORM
    default_filenames = ("model.onnx",)

    def complete_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> mc.ModelConfig:
        if not isinstance(signature, autocomplete.GraphSignature):
            signature = autocomplete.read_signature(model_file)
        return autocomplete.complete(config, signature)

    def remembered_signature(
        self, config: mc.ModelConfig, model_file: Path, facts: SourceFacts
    ) -> object | None:
        """Every file this backend serves is an ONNX graph, whatever its name."""
        return facts.signature(model_file)

    def check_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> None:
        if not isinstance(signature, autocomplete.GraphSignature):
            signature = autocomplete.read_signature(model_file)
        batch = (-1,) if config.max_batch_size > 0 else ()
        graph_inputs = {t.name: t for t in signature.inputs}
        graph_outputs = {t.name: t for t in signature.outputs}
        for kind, tensors, graph in (
            ("input", config.input, graph_inputs),
            ("output", config.output, graph_outputs),
        ):
            for tensor in tensors:
                found = graph.get(tensor.name)
                if found is None:
                    raise ModelLoadError(
                        f"model '{config.name}': {kind} '{tensor.name}' is not in the ONNX "
                        f"graph, which has {sorted(graph)}"
                    )
                if found.datatype.config_type != tensor.data_type:
                    raise ModelLoadError(
                        f"model '{config.name}': {kind} '{tensor.name}' is "
                        f"{mc.DataType.Name(tensor.data_type)} in the config but "
                        f"{found.datatype.name} in the ONNX graph"
                    )
                dims = tuple(tensor.reshape.shape if tensor.HasField("reshape") else tensor.dims)
                expected = batch + dims
                if not _compatible(expected, found.shape):
                    raise ModelLoadError(
                        f"model '{config.name}': {kind} '{tensor.name}' has shape "
                        f"{list(expected)} by the config (max_batch_size "
                        f"{config.max_batch_size}) but {list(found.shape)} in the ONNX graph"
                    )
        declared = {t.name for t in config.input}
        for name in graph_inputs:
            if name not in declared:
                raise ModelLoadError(
                    f"model '{config.name}': ONNX graph input '{name}' is missing from the config"
                )

    def has_gpu(self) -> bool:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()

    def load(
        self,
        config: mc.ModelConfig,
        model_file: Path,
        placement: Placement,
        optimized: bool = False,
    ) -> Engine:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # A built engine was optimised for this machine at build time: loading skips the passes.
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if optimized
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        options.log_severity_level = 3
        intra = _int_parameter(config, "intra_op_thread_count")
        inter = _int_parameter(config, "inter_op_thread_count")
        if intra:
            options.intra_op_num_threads = intra
        if inter:
            options.inter_op_num_threads = inter
        if parameter(config, "enable_spinning", "0") not in ("1", "true", "True"):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers: list[str | tuple[str, dict[str, str]]]
        if placement.kind == mc.ModelInstanceGroup.KIND_GPU:
            if not self.has_gpu():
                raise ModelLoadError(
                    f"model '{config.name}': instance_group asks for KIND_GPU but the installed "
                    "onnxruntime has no CUDAExecutionProvider"
                )
            providers = [("CUDAExecutionProvider", {"device_id": str(placement.device_id)})]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(model_file), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(
                f"model '{config.name}': onnxruntime cannot load it: {exc}"
            ) from None
        strings = frozenset(t.name for t in config.input if t.data_type == mc.TYPE_STRING)
        cpu = placement.kind != mc.ModelInstanceGroup.KIND_GPU
        return OnnxRuntimeEngine(
            session, strings, OutputBinding.of(config, session) if cpu else None
        )


def _compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _int_parameter(config: mc.ModelConfig, key: str) -> int:
    value = parameter(config, key, "0")
    try:
        return max(0, int(value))
    except ValueError:
        raise ModelLoadError(
            f"model '{config.name}': parameter {key} must be an integer, got '{value}'"
        ) from None
