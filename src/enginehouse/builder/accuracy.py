"""The accuracy gate's figures: how far a built engine's outputs are from the source's.

Per output, the largest absolute difference and that difference relative to the largest
magnitude of the reference, over every sample. Non-float outputs must match exactly
(an error of 1 otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from enginehouse.config.build_spec import BuildSpec


class OutputErrors:
    """Max absolute and relative error of each output, accumulated over samples."""

    def __init__(self, names: Iterable[str]) -> None:
        self.errors = {name: {"max_abs": 0.0, "max_rel": 0.0} for name in names}

    def add(self, name: str, reference: np.ndarray, built: np.ndarray) -> None:
        entry = self.errors[name]
        if reference.dtype.kind not in "fc":
            mismatch = 0.0 if np.array_equal(reference, built) else 1.0
            entry["max_abs"] = max(entry["max_abs"], mismatch)
            entry["max_rel"] = max(entry["max_rel"], mismatch)
            return
        if not reference.size:
            return
        want = reference.astype(np.float64)
        diff = float(np.max(np.abs(want - np.asarray(built, np.float64))))
        scale = float(np.max(np.abs(want)))
        entry["max_abs"] = max(entry["max_abs"], diff)
        entry["max_rel"] = max(entry["max_rel"], diff / max(scale, 1e-12))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {n: {k: round(v, 8) for k, v in e.items()} for n, e in self.errors.items()}

    @property
    def max_relative(self) -> float:
        return max((e["max_rel"] for e in self.errors.values()), default=0.0)

    def add_results(self, torch: Any, reference: Any, built: Any) -> None:
        """Add one run of each program: their results, a tensor or a sequence of tensors in
        the order of this object's names."""
        pairs = zip(self.errors, as_tensors(torch, reference), as_tensors(torch, built))
        for name, want, got in pairs:
            self.add(name, _host(want), _host(got))


def as_tensors(torch: Any, result: Any) -> tuple[Any, ...]:
    """A program's result as a tuple of tensors (one tensor, or its sequence of them)."""
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def relative_difference(torch: Any, reference: Any, built: Any) -> float:
    """max |built - reference| / max |reference| over every output of one run."""
    errors = OutputErrors(str(i) for i in range(len(as_tensors(torch, reference))))
    errors.add_results(torch, reference, built)
    return errors.max_relative


def _host(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def build_manifest(
    source: Path,
    spec: BuildSpec,
    artefact: str,
    accuracy: Mapping[str, dict[str, float]],
    target: dict[str, Any],
    optimized: bool,
) -> dict[str, Any]:
    """What every engine build records beside its artefact: what it was built from and for,
    and how far its outputs are from the source's (``target``: the builder's fingerprint of
    the machine it built for)."""
    return {
        "backend": spec.backend,
        "precision": spec.precision,
        "artefact": artefact,
        "source": source.name,
        "source_size": source.stat().st_size,
        "spec": spec.key_parts(),
        "target": target,
        "accuracy": dict(accuracy),
        "optimized": optimized,
        "max_relative_error": max((a["max_rel"] for a in accuracy.values()), default=0.0),
    }
