"""From a model version's source file to the file its instances load: build or cache hit.

A build runs only off the request path: in ``enginehouse build`` ahead of time, or while a
version loads. The accuracy gate is checked against the entry's manifest on every use, so
a stricter tolerance takes effect without a rebuild.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.builder import onnx_builder, torch_builder
from enginehouse.builder.cache import CacheEntry, EngineCache, cache_key
from enginehouse.config.build_spec import BuildSpec, build_spec
from enginehouse.errors import ModelLoadError

log = logging.getLogger(__name__)

BUILDERS = {"onnxruntime": onnx_builder, "pytorch": torch_builder}


@dataclass(frozen=True, slots=True)
class BuiltEngine:
    """The file to load and, when it was built, its cache entry and whether it was a hit."""

    path: Path
    spec: BuildSpec | None = None
    entry: CacheEntry | None = None
    hit: bool = False

    @property
    def manifest(self) -> dict[str, Any]:
        return self.entry.manifest if self.entry else {}


def prepare(
    config: mc.ModelConfig,
    backend: str,
    version: int,
    source: Path,
    model_dir: Path,
    cache: EngineCache,
    target: str = "cpu",
    ahead_of_time: bool = False,
) -> BuiltEngine:
    """The engine to serve for one version: the source when no build is asked for, else the
    cached artefact (built now on a miss)."""
    spec = build_spec(config, backend, target)
    builder = BUILDERS.get(backend)
    if spec is None or builder is None:
        return BuiltEngine(source)
    try:
        source_hash = cache.facts.sha256(source)
    except OSError as exc:
        raise ModelLoadError(f"model '{config.name}': cannot read {source}: {exc}") from None
    key = cache_key(source_hash, spec.key_parts(), builder.fingerprint(target))

    def build(out: Path) -> dict[str, Any]:
        if ahead_of_time:
            log.info(
                "model '%s' version %d: building %s %s engine",
                config.name,
                version,
                backend,
                spec.precision,
            )
        else:
            log.info(
                "model '%s' version %d: building %s %s engine at load (cache miss; "
                "`enginehouse build` ahead of time avoids this)",
                config.name,
                version,
                backend,
                spec.precision,
            )
        fields = builder.build(source, config, spec, model_dir, out)
        fields["source_sha256"] = source_hash
        # What `enginehouse cache ls` shows of the entry.
        fields.setdefault("model", config.name)
        fields.setdefault("version", version)
        fields["engine_target"] = target
        return fields

    entry, hit = cache.get_or_build(key, build)
    if hit:
        log.info("model '%s' version %d: engine cache hit %s", config.name, version, key[:12])
    check_accuracy(config.name, spec, entry.manifest)
    return BuiltEngine(entry.file(entry.manifest["artefact"]), spec, entry, hit)


def check_accuracy(model: str, spec: BuildSpec, manifest: dict[str, Any]) -> None:
    """Fail a build over tolerance unless it was forced."""
    error = float(manifest.get("max_relative_error", 0.0))
    if error <= spec.tolerance:
        return
    detail = ", ".join(
        f"{name}: max abs {figures['max_abs']:.3g}, max rel {figures['max_rel']:.3g}"
        for name, figures in manifest.get("accuracy", {}).items()
    )
    if spec.force:
        log.warning(
            "model '%s': %s engine is over tolerance %.3g (%s); kept: engine_force",
            model,
            spec.precision,
            spec.tolerance,
            detail,
        )
        return
    raise ModelLoadError(
        f"model '{model}': {spec.precision} engine fails the accuracy gate: relative error "
        f"{error:.3g} > tolerance {spec.tolerance:.3g} ({detail}); raise engine_tolerance or "
        "set engine_force to keep it"
    )
