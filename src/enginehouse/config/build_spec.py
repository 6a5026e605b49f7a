"""What to build for a model: the build spec, read once from its config.pbtxt.

Triton's own fields are used where they exist (``optimization.graph.level``,
``instance_group.kind`` for the target); the rest are documented ``parameters`` keys:

- ``engine_build``: ``true`` (default) or ``false`` to serve the source file as it is.
- ``engine_precision``: ``fp32`` (default), ``fp16``, ``bf16``, ``int8`` or ``fp8`` (fp8, and
  int8 for PyTorch models, quantise the linear layers of GPU engines through torchao).
- ``engine_profiles``: JSON, per input the variable dims to specialise:
  ``{"input_ids": {"1": {"min": 1, "opt": 128, "max": 512, "buckets": [128, 256, 512]}}}``
  (dim indices count the batch dim as 0 for batching models).
- ``engine_calibration``: a folder (relative to the model folder) of ``.npy`` / ``.npz``
  samples, one input name per array (``.npz``) or ``<input>.npy`` files in sub-folders.
- ``engine_calibration_random_samples``: a number of seeded random samples, used only when
  asked for explicitly (int8 needs real data to be accurate).
- ``engine_int8_mode``: ``static`` (default: weights and activations quantised ahead of
  time from the calibration data) or ``dynamic`` (weights ahead of time, activations per
  batch at run time; no calibration needed, and far more accurate on transformers).
- ``engine_tolerance``: the largest relative error accepted by the accuracy gate
  (max |built - source| / max |source| over every output); defaults per precision.
- ``engine_force``: ``true`` keeps a build that fails the accuracy gate.
- ``engine_autotune``: ``true`` lets Inductor benchmark kernel choices (PyTorch builds).
- ``engine_static_batch_sizes``: batch sizes (``"128,256"``) for which a PyTorch GPU build
  also compiles the model with that batch fixed, kept only where it measures faster than the
  engine of symbolic batch (builder/static_batches.py).
- ``engine_fuse_convolutions``: ``true`` (default) lets a PyTorch GPU build in fp16 or bf16
  fold batch norms into convolutions and run convolution -> [add ->] ReLU chains as one
  cuDNN call (builder/conv_fusion.py); ``false`` compiles the convolutions as they are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.config.model_config import flag_parameter, parameter
from enginehouse.errors import ModelLoadError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.1, "fp8": 0.1}


@dataclass(frozen=True, slots=True)
class ShapeProfile:
    """One variable dimension of one input: its range and the sizes to specialise for."""

    input: str
    dim: int
    min: int
    opt: int
    max: int
    buckets: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """Everything that decides what a build produces (and so its cache key)."""

    backend: str
    precision: str = "fp32"
    target: str = "cpu"
    graph_level: int = 0
    profiles: tuple[ShapeProfile, ...] = ()
    calibration: str = ""
    calibration_random_samples: int = 0
    int8_mode: str = "static"
    tolerance: float = DEFAULT_TOLERANCE["fp32"]
    force: bool = False
    # Let Inductor benchmark kernel choices while building (slower builds, faster engines).
    autotune: bool = False
    # Batch sizes to compile a fixed-batch engine for beside the symbolic one (GPU builds).
    static_batches: tuple[int, ...] = ()
    # Fold batch norms and fuse convolution chains for cuDNN (GPU builds in fp16 and bf16).
    fuse_convolutions: bool = True

    def key_parts(self) -> dict[str, Any]:
        """The fields that change the artefact. The tolerance and force only decide whether a
        built artefact is accepted, and are checked against its manifest on every use."""
        parts = asdict(self)
        parts.pop("force")
        parts.pop("tolerance")
        # The builder's fingerprint names the device (model and index: GPU engines are
        # compiled for one device), so the spec keeps only the kind.
        parts["target"] = self.target.split(":")[0]
        if not self.static_batches:  # keys made before the field existed stay valid
            parts.pop("static_batches")
        if self.fuse_convolutions:  # keyed only when off, as static_batches only when set
            parts.pop("fuse_convolutions")
        return parts


def _profiles(config: mc.ModelConfig, raw: str) -> tuple[ShapeProfile, ...]:
    model = config.name
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model '{model}': engine_profiles is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ModelLoadError(f"model '{model}': engine_profiles must be a JSON object")
    inputs = {t.name: t for t in config.input}
    found: list[ShapeProfile] = []
    for name, dims in document.items():
        if name not in inputs:
            raise ModelLoadError(f"model '{model}': engine_profiles names unknown input '{name}'")
        if not isinstance(dims, dict):
            raise ModelLoadError(f"model '{model}': engine_profiles['{name}'] must be an object")
        for dim_text, bounds in dims.items():
            try:
                dim = int(dim_text)
                low, opt, high = int(bounds["min"]), int(bounds["opt"]), int(bounds["max"])
                buckets = tuple(int(b) for b in bounds.get("buckets", ()))
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(
                    f"model '{model}': engine_profiles['{name}']['{dim_text}'] needs integer "
                    "min, opt, max (and optional buckets)"
                ) from None
            if not 1 <= low <= opt <= high:
                raise ModelLoadError(
                    f"model '{model}': profile of input '{name}' dim {dim} must have "
                    f"1 <= min <= opt <= max, got min {low}, opt {opt}, max {high}"
                )
            if any(not low <= b <= high for b in buckets):
                raise ModelLoadError(
                    f"model '{model}': buckets {list(buckets)} of input '{name}' dim {dim} "
                    f"must lie in [{low}, {high}]"
                )
            found.append(ShapeProfile(name, dim, low, opt, high, tuple(sorted(set(buckets)))))
    return tuple(found)


def static_batch_sizes(config: mc.ModelConfig) -> tuple[int, ...]:
    """``engine_static_batch_sizes``: distinct batch sizes within the model's batch range."""
    text = parameter(config, "engine_static_batch_sizes", "").strip()
    if not text:
        return ()
    try:
        sizes = tuple(sorted({int(item) for item in text.split(",")}))
    except ValueError:
        sizes = (0,)
    if config.max_batch_size < 1 or sizes[0] < 1 or sizes[-1] > config.max_batch_size:
        raise ModelLoadError(
            f"model '{config.name}': engine_static_batch_sizes must be batch sizes between 1 "
            f"and max_batch_size ({config.max_batch_size}) of a batching model, got '{text}'"
        )
    return sizes


def engine_precision(config: mc.ModelConfig) -> str:
    """The ``engine_precision`` a config asks for (build_spec checks it)."""
    return parameter(config, "engine_precision", "fp32").strip().lower()


def build_spec(config: mc.ModelConfig, backend: str, target: str = "cpu") -> BuildSpec | None:
    """The spec a model's config asks for, or None when it asks to serve the source."""
    model = config.name
    if not flag_parameter(config, "engine_build", True):
        return None
    precision = engine_precision(config)
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"model '{model}': engine_precision '{precision}' is not one of {', '.join(PRECISIONS)}"
        )
    tolerance_text = parameter(config, "engine_tolerance", "")
    try:
        tolerance = float(tolerance_text) if tolerance_text else DEFAULT_TOLERANCE[precision]
        random_samples = int(parameter(config, "engine_calibration_random_samples", "0"))
    except ValueError:
        raise ModelLoadError(
            f"model '{model}': engine_tolerance must be a number and "
            "engine_calibration_random_samples an integer"
        ) from None
    profiles_text = parameter(config, "engine_profiles", "")
    int8_mode = parameter(config, "engine_int8_mode", "static").strip().lower()
    if int8_mode not in ("static", "dynamic"):
        raise ModelLoadError(
            f"model '{model}': engine_int8_mode must be static or dynamic, got '{int8_mode}'"
        )
    return BuildSpec(
        backend=backend,
        precision=precision,
        target=target,
        graph_level=config.optimization.graph.level,
        profiles=_profiles(config, profiles_text) if profiles_text else (),
        calibration=parameter(config, "engine_calibration", ""),
        calibration_random_samples=max(0, random_samples),
        int8_mode=int8_mode if precision == "int8" else "static",
        tolerance=tolerance,
        force=flag_parameter(config, "engine_force", False),
        autotune=flag_parameter(config, "engine_autotune", False),
        static_batches=static_batch_sizes(config),
        fuse_convolutions=flag_parameter(config, "engine_fuse_convolutions", True),
    )
