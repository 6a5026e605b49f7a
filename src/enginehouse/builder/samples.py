"""Input samples for calibration and for the accuracy gate.

Calibration data is a folder of samples, each either one ``.npz`` file (an array per input
name) or one sub-folder of ``<input>.npy`` files. Every array is checked against the
config (datatype and dims, batch dim first for batching models). Random samples are made
only when the config asks for them by count; they are seeded, so builds repeat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.config.build_spec import BuildSpec
from enginehouse.errors import ModelLoadError
from enginehouse.repository.paths import contained

Sample = dict[str, np.ndarray]


def _check(config: mc.ModelConfig, sample: Sample, source: str) -> Sample:
    model = config.name
    batching = config.max_batch_size > 0
    for tensor in config.input:
        if tensor.name not in sample:
            if tensor.optional:
                continue
            raise ModelLoadError(
                f"model '{model}': calibration sample {source} has no input '{tensor.name}'"
            )
        array = sample[tensor.name]
        expected = datatypes.BY_CONFIG[tensor.data_type].numpy
        if array.dtype != expected:
            raise ModelLoadError(
                f"model '{model}': calibration sample {source} input '{tensor.name}' is "
                f"{array.dtype}, the config says {expected}"
            )
        dims = list(tensor.dims)
        shape = list(array.shape)
        body = shape[1:] if batching else shape
        if len(body) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, body)):
            raise ModelLoadError(
                f"model '{model}': calibration sample {source} input '{tensor.name}' has shape "
                f"{shape}, the config says {'[batch] + ' if batching else ''}{dims}"
            )
    unknown = set(sample) - {t.name for t in config.input}
    if unknown:
        raise ModelLoadError(
            f"model '{model}': calibration sample {source} has unknown inputs {sorted(unknown)}"
        )
    return sample


def load_calibration(config: mc.ModelConfig, model_dir: Path, folder: str) -> list[Sample]:
    """The samples in ``<model_dir>/<folder>``, checked against the config."""
    root = contained(model_dir, folder, "parameter engine_calibration", config.name)
    if not root.is_dir():
        raise ModelLoadError(f"model '{config.name}': calibration folder {root} does not exist")
    samples: list[Sample] = []
    for entry in sorted(root.iterdir()):
        try:
            if entry.suffix == ".npz":
                with np.load(entry, allow_pickle=False) as archive:
                    sample = {name: archive[name] for name in archive.files}
            elif entry.is_dir():
                sample = {p.stem: np.load(p, allow_pickle=False) for p in entry.glob("*.npy")}
            else:
                continue
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"model '{config.name}': cannot read calibration sample {entry.name}: {exc}"
            ) from None
        samples.append(_check(config, sample, entry.name))
    if not samples:
        raise ModelLoadError(f"model '{config.name}': no .npz files or sample folders in {root}")
    return samples


def random_samples(
    config: mc.ModelConfig, spec: BuildSpec, count: int, seed: int = 0
) -> list[Sample]:
    """``count`` seeded samples shaped by the config (variable dims at the profile's opt)."""
    rng = np.random.default_rng(seed)
    opt = {(p.input, p.dim): p.opt for p in spec.profiles}
    batching = config.max_batch_size > 0
    samples = []
    for _ in range(count):
        sample: Sample = {}
        for tensor in config.input:
            dims = ([-1] if batching else []) + list(tensor.dims)
            shape = tuple(
                (opt.get((tensor.name, i), 1) if d == -1 else d) for i, d in enumerate(dims)
            )
            dtype = datatypes.BY_CONFIG[tensor.data_type].numpy
            if dtype.kind == "f":
                sample[tensor.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                sample[tensor.name] = rng.integers(0, 2, shape).astype(bool)
            elif dtype.kind in "iu":
                # Integer inputs are mostly ids and indices: zero is valid for nearly all.
                sample[tensor.name] = np.zeros(shape, dtype)
            elif dtype.kind == "O":
                text = np.empty(shape, dtype=np.object_)
                text.fill("sample")
                sample[tensor.name] = text
            else:
                raise ModelLoadError(
                    f"model '{config.name}': cannot make random samples for "
                    f"input '{tensor.name}' of type {dtype}"
                )
        samples.append(sample)
    return samples
