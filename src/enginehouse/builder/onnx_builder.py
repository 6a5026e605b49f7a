"""Building ONNX Runtime engines: optimised graphs, FP16 conversion, INT8 quantisation.

The artefact is an ONNX file that a session loads instead of the source: for fp32 the graph
after ONNX Runtime's optimisations for this machine, for fp16 the graph converted with its
inputs and outputs kept in their types, for int8 the graph statically quantised (QDQ,
per-channel weights) from calibration samples.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.builder.accuracy import OutputErrors, build_manifest
from enginehouse.builder.samples import Sample, load_calibration, random_samples
from enginehouse.config.build_spec import BuildSpec
from enginehouse.config.model_config import to_engine_shapes
from enginehouse.errors import ModelLoadError

log = logging.getLogger(__name__)

ARTEFACT = "model.onnx"
BUILDER_VERSION = 4


@functools.lru_cache(maxsize=1)
def has_vnni() -> bool:
    """Whether the CPU has VNNI dot products. Without them ONNX Runtime's u8s8 kernels can
    saturate 16-bit intermediates, so weights are quantised to 7 bits (reduce_range)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or platform.machine() != "x86_64"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=8)
def _fingerprint(target: str) -> tuple[tuple[str, Any], ...]:
    from importlib.metadata import version

    return (
        ("target", target),
        ("device", cpu_model() if target == "cpu" else target),
        ("machine", platform.machine()),
        ("vnni", has_vnni()),
        ("onnxruntime", version("onnxruntime")),
        ("onnx", version("onnx")),
        ("builder", BUILDER_VERSION),
    )


def fingerprint(target: str) -> dict[str, Any]:
    """What the artefact depends on besides the model and the spec."""
    return dict(_fingerprint(target))


def _level(spec: BuildSpec) -> Any:
    import onnxruntime as ort

    levels = ort.GraphOptimizationLevel
    if spec.graph_level < 0:
        return levels.ORT_ENABLE_BASIC
    if spec.graph_level == 1:
        return levels.ORT_ENABLE_EXTENDED
    return levels.ORT_ENABLE_ALL


def _session(path: Path, level: Any = None, optimized_to: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over our samples."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def gate_samples(config: mc.ModelConfig, spec: BuildSpec, model_dir: Path) -> list[Sample]:
    """Inputs for calibration and the accuracy gate: the calibration data, or seeded random
    samples (the count asked for, else two for the gate alone)."""
    if spec.calibration:
        return load_calibration(config, model_dir, spec.calibration)
    if spec.calibration_random_samples:
        return random_samples(config, spec, spec.calibration_random_samples)
    if spec.precision == "int8" and spec.int8_mode == "static":
        raise ModelLoadError(
            f"model '{config.name}': int8 needs calibration data: set engine_calibration to a "
            "folder of samples, or engine_calibration_random_samples to a count"
        )
    return random_samples(config, spec, 2)


def build(
    source: Path, config: mc.ModelConfig, spec: BuildSpec, model_dir: Path, out: Path
) -> dict[str, Any]:
    """Write the artefact for ``spec`` into ``out``; returns the manifest's fields."""
    import onnx

    model = config.name
    artefact = out / ARTEFACT
    samples = gate_samples(config, spec, model_dir)
    if spec.target != "cpu":
        raise ModelLoadError(
            f"model '{model}': the onnxruntime builder targets cpu here; this onnxruntime has "
            f"no execution provider for {spec.target}"
        )
    try:
        if spec.precision == "fp32":
            _session(source, _level(spec), optimized_to=artefact)
        elif spec.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
            onnx.save(converted, str(artefact))
        elif spec.precision == "int8":
            from onnxruntime.quantization import (
                QuantFormat,
                QuantType,
                quantize_dynamic,
                quantize_static,
            )
            from onnxruntime.quantization.shape_inference import quant_pre_process

            prepared = out / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            if spec.int8_mode == "dynamic":
                quantize_dynamic(
                    str(prepared),
                    str(artefact),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    reduce_range=not has_vnni(),
                    op_types_to_quantize=["MatMul", "Gemm"],
                )
            else:
                quantize_static(
                    str(prepared),
                    str(artefact),
                    _Reader([to_engine_shapes(config, s) for s in samples]),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=not has_vnni(),
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    # The compute-heavy ops only: quantising normalisations and softmax costs
                    # accuracy (transformers) and buys little speed.
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    # Products of two activations (attention scores) lose most from 8 bits.
                    extra_options={"MatMulConstBOnly": True},
                )
            prepared.unlink()
        else:
            raise ModelLoadError(
                f"model '{model}': {spec.precision} is not available on the onnxruntime CPU "
                "builder (use fp32, fp16 or int8, or the torch backend)"
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # ORT and onnx raise many types for invalid or unsupported graphs
        raise ModelLoadError(f"model '{model}': {spec.precision} build failed: {exc}") from None
    optimized = spec.precision == "fp32"
    if not optimized:
        # Optimise the converted graph too, so that loading it skips ONNX Runtime's passes.
        staged = out / "unoptimized.onnx"
        artefact.rename(staged)
        try:
            _session(staged, _level(spec), optimized_to=artefact)
            staged.unlink()
            optimized = True
        except Exception as exc:  # some converted graphs do not survive every pass
            log.warning("model '%s': %s graph kept unoptimised: %s", model, spec.precision, exc)
            if artefact.exists():
                artefact.unlink()
            staged.rename(artefact)
    for leftover in out.iterdir():
        if leftover.name != ARTEFACT and leftover.is_file():
            leftover.unlink()
    accuracy = measure_accuracy(source, artefact, config, samples[:8])
    return build_manifest(source, spec, ARTEFACT, accuracy, fingerprint(spec.target), optimized)


def measure_accuracy(
    source: Path, artefact: Path, config: mc.ModelConfig, samples: list[Sample]
) -> dict[str, dict[str, float]]:
    """Max absolute and relative error of every float output, built vs source (fp32)."""
    try:
        reference = _session(source)
        built = _session(artefact)
    except Exception as exc:
        raise ModelLoadError(f"model '{config.name}': built engine does not load: {exc}") from None
    names = [t.name for t in config.output]
    errors = OutputErrors(names)
    for index, sample in enumerate(samples):
        feeds = to_engine_shapes(config, sample)
        try:
            expected = reference.run(names, feeds)
        except Exception as exc:
            raise ModelLoadError(
                f"model '{config.name}': the source model rejects accuracy-gate sample {index} "
                f"({exc}); give calibration data that the model accepts (engine_calibration)"
            ) from None
        try:
            got = built.run(names, feeds)
        except Exception as exc:
            raise ModelLoadError(
                f"model '{config.name}': the built engine fails on sample {index}: {exc}"
            ) from None
        for name, want, have in zip(names, expected, got):
            errors.add(name, np.asarray(want), np.asarray(have))
    return errors.as_dict()
