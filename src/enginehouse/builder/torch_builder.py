"""Building PyTorch engines: an ExportedProgram compiled into an AOTInductor package.

Sources are torch.export programs (``model.pt2``), TorchScript (``model.pt``, frozen) and
ONNX models (``model.onnx``, converted by ``onnx_to_torch`` and exported here).

The program is re-exported around a wrapper that casts inputs to the build precision and
outputs back, so fp16/bf16 engines keep the config's fp32 interface, and with the batch
dimension (and the shape profiles' dims) dynamic over their ranges. AOTInductor compiles it
for the cpu target once; the package then loads in milliseconds. GPU targets get a
standalone Inductor artifact instead (backends/inductor_artifact.py says why).
"""

from __future__ import annotations

import copy
import functools
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends import inductor_artifact, torch_compile
from enginehouse.backends.onnx_to_torch import onnx_module
from enginehouse.backends.torch_programs import (
    TORCH_LOCK,
    import_torch,
    is_onnx,
    is_torchscript,
    load_program,
    load_torchscript,
    program_on,
)
from enginehouse.backends.torch_quantize import QUANTIZED
from enginehouse.builder import conv_fusion, static_batches
from enginehouse.builder.accuracy import OutputErrors, build_manifest, relative_difference
from enginehouse.builder.onnx_builder import cpu_model
from enginehouse.builder.samples import Sample, load_calibration, random_samples
from enginehouse.config.build_spec import BuildSpec
from enginehouse.errors import ModelLoadError

log = logging.getLogger(__name__)

ARTEFACT = "aoti.pt2"
TORCHSCRIPT_ARTEFACT = "frozen.pt"
BUILDER_VERSION = 5
# int8 and fp8 engines quantise the linear layers of a bf16 program (torch_quantize.py).
_DTYPES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "int8": "bfloat16",
    "fp8": "bfloat16",
}

# GPU precisions whose convolutions are fused for cuDNN, and how far (relative to the largest
# output) the fused program's answers may lie from the unfused one's: folding a batch norm
# rounds the weights once more in that precision.
_CUDNN_FUSED = ("fp16", "bf16")
_FUSED_TOLERANCE = 2e-2


@functools.lru_cache(maxsize=8)
def _fingerprint(target: str) -> tuple[tuple[str, Any], ...]:
    torch = import_torch()
    device = cpu_model()
    if target.startswith("cuda"):
        index = int(target.split(":")[1]) if ":" in target else 0
        major, minor = torch.cuda.get_device_capability(index)
        device = f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"
    return (
        ("target", target),
        ("device", device),
        ("machine", platform.machine()),
        ("torch", torch.__version__),
        ("builder", BUILDER_VERSION),
    )


def fingerprint(target: str) -> dict[str, Any]:
    """What the package depends on besides the program and the spec."""
    return dict(_fingerprint(target))


def _samples(config: mc.ModelConfig, spec: BuildSpec, model_dir: Path) -> list[Sample]:
    if spec.calibration:
        return load_calibration(config, model_dir, spec.calibration)
    return random_samples(config, spec, max(2, spec.calibration_random_samples))


def build(
    source: Path, config: mc.ModelConfig, spec: BuildSpec, model_dir: Path, out: Path
) -> dict[str, Any]:
    """Compile ``source`` for ``spec`` into ``out/aoti.pt2``; returns the manifest's fields."""
    with TORCH_LOCK:
        if is_torchscript(source):
            return _build_torchscript(source, config, spec, model_dir, out)
        return _build(source, config, spec, model_dir, out)


def _build_torchscript(
    source: Path, config: mc.ModelConfig, spec: BuildSpec, model_dir: Path, out: Path
) -> dict[str, Any]:
    """TorchScript: frozen (weights folded into the graph, fp32), saved as ``frozen.pt``."""
    torch = import_torch()
    if spec.precision != "fp32" or spec.target != "cpu":
        raise ModelLoadError(
            f"model '{config.name}': TorchScript sources build fp32 engines for the cpu; export "
            "the model with torch.export (model.pt2) for fp16/bf16 AOTInductor engines"
        )
    reference = load_torchscript(source, config.name)
    try:
        # optimize_for_inference's MKLDNN rewrites do not survive save/load: freeze only.
        frozen = torch.jit.freeze(load_torchscript(source, config.name))
        torch.jit.save(frozen, str(out / TORCHSCRIPT_ARTEFACT))
    except Exception as exc:
        raise ModelLoadError(f"model '{config.name}': TorchScript freeze failed: {exc}") from None
    errors = _accuracy(torch, config, _samples(config, spec, model_dir), reference, frozen, "cpu")
    return _manifest(source, spec, TORCHSCRIPT_ARTEFACT, errors)


def _build(
    source: Path, config: mc.ModelConfig, spec: BuildSpec, model_dir: Path, out: Path
) -> dict[str, Any]:
    torch = import_torch()
    model = config.name
    if spec.precision not in _DTYPES:
        raise ModelLoadError(
            f"model '{model}': the pytorch builder makes fp32, fp16, bf16, int8 or fp8 "
            f"engines, not {spec.precision}"
        )
    device = "cpu" if spec.target == "cpu" else spec.target
    if spec.precision in QUANTIZED and device == "cpu":
        raise ModelLoadError(
            f"model '{model}': {spec.precision} PyTorch engines are built for the cuda target "
            "(KIND_GPU); for int8 on the CPU use the onnxruntime backend"
        )
    samples = _samples(config, spec, model_dir)
    dynamic = _dynamic_shapes(torch, config, spec)
    program = _source_program(torch, source, config, samples, dynamic)
    dtype = getattr(torch, _DTYPES[spec.precision])
    reference = program.module()
    source_dtypes = _user_input_dtypes(program)

    class Cast(torch.nn.Module):  # type: ignore[name-defined,misc]
        """Keeps the config's I/O types around a lower-precision program."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
            if channels_last:
                cast = [
                    a.contiguous(memory_format=torch.channels_last) if a.ndim == 4 else a
                    for a in cast
                ]
            result = self.inner(*cast)
            if isinstance(result, torch.Tensor):
                return result.float() if result.is_floating_point() else result
            return tuple(r.float() if r.is_floating_point() else r for r in result)

    inner = program_on(copy.deepcopy(program), device)  # the reference stays fp32
    if spec.precision != "fp32":
        inner = inner.to(dtype)
    # Tensor cores read convolutions' images channels-last: convert weights and inputs once.
    convolutions = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
    channels_last = device != "cpu" and any(
        node.target in convolutions for node in program.graph.nodes
    )
    if channels_last:
        inner = inner.to(memory_format=torch.channels_last)
    example = _example(torch, config, samples, device)
    if channels_last and spec.precision in _CUDNN_FUSED and spec.fuse_convolutions:
        inner = _fuse_convolutions(torch, model, inner, lambda m: Cast(m).to(device), example)
    wrapped = Cast(inner).to(device)  # exported graphs have no train/eval modes
    try:
        exported = torch.export.export(wrapped, example, dynamic_shapes=(tuple(dynamic),))
        if device == "cpu":
            options = {"max_autotune": True} if spec.autotune else {}
            path = torch._inductor.aoti_compile_and_package(
                exported, package_path=str(out / ARTEFACT), inductor_configs=options
            )
            runner = torch._inductor.aoti_load_package(path)
            artefact = ARTEFACT
        else:
            runner, artefact = _build_compiled(
                torch, exported, example, config, spec, out, channels_last
            )
        if spec.static_batches:
            _build_static_batches(
                torch, wrapped, runner, exported, config, spec, samples, dynamic, out, channels_last
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # export and inductor raise many types
        raise ModelLoadError(f"model '{model}': engine build failed: {exc}") from None
    errors = _accuracy(torch, config, samples, reference, runner, device, source_dtypes)
    return _manifest(source, spec, artefact, errors)


def _fuse_convolutions(
    torch: Any, model: str, inner: Any, wrap: Any, example: tuple[Any, ...]
) -> Any:
    """``inner`` with its convolutions fused with their batch norms, residual adds and
    ReLUs for cuDNN (builder/conv_fusion.py), where cuDNN runs the fused program on this
    device and it answers as ``inner`` does (within the precision's rounding); else
    ``inner`` as it was. ``wrap`` makes a module callable with ``example``."""
    candidate = copy.deepcopy(inner)
    try:
        fused = conv_fusion.fuse(torch, candidate)
        if not fused:
            return inner
        with torch.inference_mode():
            want, got = wrap(inner)(*example), wrap(candidate)(*example)
            difference = relative_difference(torch, want, got)
        if not difference <= _FUSED_TOLERANCE:
            raise ValueError(f"answers differ from the unfused program's by {difference:.3g}")
    except Exception as exc:  # cuDNN and tracing raise many types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.info("model '%s': convolutions left as they were (%s)", model, message)
        return inner
    log.info(
        "model '%s': %d convolutions fused with their batch norm, residual add and ReLU",
        model,
        fused,
    )
    return candidate


def _user_input_dtypes(program: Any) -> list[Any]:
    """The dtypes the exported program was traced with, per user input: the config may
    carry an input narrower than the source takes it (an FP16 image into an fp32 program)."""
    users = set(program.graph_signature.user_inputs)
    return [
        node.meta["val"].dtype
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in users and "val" in node.meta
    ]


def _example(
    torch: Any, config: mc.ModelConfig, samples: list[Sample], device: str, rows: int = 2
) -> tuple[Any, ...]:
    """The inputs to trace with: torch.export specialises dims of size 1, so a batch of two
    (``rows``) where the model batches."""
    repeat = min(rows, config.max_batch_size) if config.max_batch_size >= 1 else 1
    return tuple(
        torch.from_numpy(
            np.concatenate([samples[0][t.name]] * repeat)
            if config.max_batch_size
            else samples[0][t.name]
        ).to(device)
        for t in config.input
    )


def _dynamic_shapes(torch: Any, config: mc.ModelConfig, spec: BuildSpec) -> list[dict[int, Any]]:
    """Per input, its dynamic dims: the batch (shared by every input) and the profiles'."""
    dynamic: list[dict[int, Any]] = []
    profiles = {(p.input, p.dim): p for p in spec.profiles}
    shared = (
        torch.export.Dim("batch", min=1, max=config.max_batch_size)
        if config.max_batch_size > 0
        else None
    )
    for tensor in config.input:
        dims: dict[int, Any] = {0: shared} if shared is not None else {}
        for (name, dim), profile in profiles.items():
            if name == tensor.name:
                dims[dim] = torch.export.Dim(f"{name}_{dim}", min=profile.min, max=profile.max)
        dynamic.append(dims)
    return dynamic


def _source_program(
    torch: Any,
    source: Path,
    config: mc.ModelConfig,
    samples: list[Sample],
    dynamic: list[dict[int, Any]],
) -> Any:
    """The source as an ExportedProgram: loaded (model.pt2) or converted (ONNX)."""
    if not is_onnx(source):
        return load_program(source, config.name)
    module = onnx_module(source, config.name)
    try:
        return torch.export.export(
            module, _example(torch, config, samples, "cpu"), dynamic_shapes=(tuple(dynamic),)
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # export raises many types
        raise ModelLoadError(
            f"model '{config.name}': the ONNX model converts to PyTorch but does not export "
            f"with the config's dynamic dims: {str(exc).splitlines()[0]}"
        ) from None


def _build_compiled(
    torch: Any,
    exported: Any,
    example: tuple[Any, ...],
    config: mc.ModelConfig,
    spec: BuildSpec,
    out: Path,
    channels_last: bool,
) -> tuple[Any, str]:
    """GPU targets: a standalone Inductor artifact where the program allows one, else the
    converted program plus Inductor's kernels for torch.compile (see
    backends/torch_compile.py). Returns the runner and the artefact's file name.
    ``channels_last``: the program's convolutions were converted to channels-last."""
    if spec.precision not in QUANTIZED:
        try:
            checks = [example]
            if config.max_batch_size > 0:
                checks.append(tuple(torch_compile.zero_inputs(torch, config, spec.target, 1)))
            runner = inductor_artifact.save(
                torch, exported, spec.autotune, out, tuple(checks), channels_last
            )
            return runner, inductor_artifact.ARTIFACT
        except inductor_artifact.Unsupported as exc:
            log.info(
                "model '%s': %s; building for torch.compile instead of a standalone engine",
                config.name,
                exc,
            )
    torch.export.save(exported, str(out / torch_compile.PROGRAM))
    module = torch_compile.module_on(
        torch, out / torch_compile.PROGRAM, config, spec.target, spec.precision
    )
    compiled = torch_compile.compile_module(torch, module, config, spec.target, spec.autotune)
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        (out / torch_compile.KERNELS).write_bytes(artifacts[0])
    return compiled, torch_compile.PROGRAM


def _build_static_batches(
    torch: Any,
    wrapped: Any,
    runner: Any,
    exported: Any,
    config: mc.ModelConfig,
    spec: BuildSpec,
    samples: list[Sample],
    dynamic: list[dict[int, Any]],
    out: Path,
    channels_last: bool,
) -> None:
    """Fixed-batch engines beside a standalone GPU one (builder/static_batches.py). An
    AOTInductor package for the CPU, or an engine built for torch.compile (quantised, or
    refused standalone), has no place for them."""
    if not isinstance(runner, inductor_artifact.ArtifactRunner):
        log.warning(
            "model '%s': engine_static_batch_sizes applies to standalone GPU engines only, "
            "not to this %s engine: ignored",
            config.name,
            "cpu" if spec.target == "cpu" else "torch.compile",
        )
        return
    static_batches.build(
        torch,
        config.name,
        wrapped,
        lambda rows: _example(torch, config, samples, spec.target, rows),
        dynamic,
        spec,
        runner,
        inductor_artifact.lifted_weights(torch, exported),
        out,
        channels_last,
    )


def _accuracy(
    torch: Any,
    config: mc.ModelConfig,
    samples: list[Sample],
    reference: Any,
    built: Any,
    device: str,
    source_dtypes: list[Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Max absolute and relative error per output, built engine vs the fp32 source. The
    source gets each floating input as it was traced with (``source_dtypes``), the engine
    as the config types it."""
    names = [t.name for t in config.output]
    errors = OutputErrors(names)
    with torch.inference_mode():
        for sample in samples[:8]:
            args = [torch.from_numpy(sample[t.name]) for t in config.input]
            fed = args
            if source_dtypes and len(source_dtypes) == len(args):
                fed = [
                    a.to(d) if a.is_floating_point() and d.is_floating_point else a
                    for a, d in zip(args, source_dtypes)
                ]
            errors.add_results(torch, reference(*fed), built(*[a.to(device) for a in args]))
    return errors.as_dict()


def _manifest(
    source: Path, spec: BuildSpec, artefact: str, errors: dict[str, dict[str, float]]
) -> dict[str, Any]:
    return build_manifest(source, spec, artefact, errors, fingerprint(spec.target), True)
