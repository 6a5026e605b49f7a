"""Turning a model folder into loaded model versions.

Reads and completes the config, picks the backend, selects the versions the policy
serves, checks the config against each version's file and loads one engine per instance.
It blocks (sessions take time to build), so the server calls it off the event loop.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends import Backend, Placement, backend_for, backend_for_file
from enginehouse.builder import artifacts
from enginehouse.builder.cache import EngineCache
from enginehouse.config import model_config
from enginehouse.core.model import ModelVersion
from enginehouse.core.routing import parse_version_weights
from enginehouse.errors import ModelLoadError
from enginehouse.repository import ModelLocation, select_versions
from enginehouse.repository.fingerprint import version_identity
from enginehouse.repository.paths import check_config_paths
from enginehouse.runtime import warmup as warmups
from enginehouse.runtime.instance import InlinePolicy, Instance
from enginehouse.runtime.memory import release_freed_memory
from enginehouse.scheduler import InstanceSupervisor, scheduler_for

log = logging.getLogger(__name__)

# The most instances instance_memory_fraction may ask for, per group and device.
MAX_SIZED_INSTANCES = 16


@dataclass(slots=True)
class LoadedModel:
    """The versions of one model that loaded, and those that failed with their reason.

    ``kept`` are the versions taken over unchanged from the model already serving.
    """

    config: mc.ModelConfig
    versions: dict[int, ModelVersion]
    failures: dict[int, str]
    kept: frozenset[int] = frozenset()

    @property
    def fresh(self) -> list[ModelVersion]:
        """The versions loaded by this call (not kept from the serving model)."""
        return [v for number, v in self.versions.items() if number not in self.kept]


def prepare_config(
    location: ModelLocation,
    strict: bool,
    override: mc.ModelConfig | None = None,
    cache: EngineCache | None = None,
) -> tuple[mc.ModelConfig, Backend, dict[int, Path]]:
    """The complete, validated config, its backend, and the model file of each served
    version (``cache``: where the model files' signatures may be remembered)."""
    config = override if override is not None else model_config.read_config(location.path)
    if config is None:
        if strict:
            raise ModelLoadError(
                f"model '{location.name}': no config.pbtxt and --strict-model-config is set"
            )
        config = mc.ModelConfig()
    if config.name and config.name != location.name:
        raise ModelLoadError(
            f"model '{location.name}': config.pbtxt names it '{config.name}'; "
            "the name must match the folder"
        )
    config.name = location.name
    version_dirs = location.version_dirs()
    check_config_paths(config, location.path, version_dirs)
    if config.platform or config.backend:
        backend = backend_for(config)
    else:
        names = sorted({p.name for d in version_dirs.values() for p in d.iterdir()})
        found = backend_for_file(names)
        if found is None:
            raise ModelLoadError(
                f"model '{location.name}': config names no backend or platform and no version "
                f"holds a model file this server knows (found {names or 'nothing'})"
            )
        backend = found
    selected = select_versions(config.version_policy, list(version_dirs))
    if not selected:
        raise ModelLoadError(
            f"model '{location.name}': no version folder matches the version policy "
            f"(found versions {sorted(version_dirs) or 'none'})"
        )
    files = {
        v: backend.model_file(version_dirs[v], config.default_model_filename) for v in selected
    }
    if not strict:
        newest = files[selected[-1]]
        if newest.is_file():
            try:
                signature = known_signature(config, backend, newest, cache)
                backend.complete_config(config, newest, signature)
            except ModelLoadError as exc:
                raise ModelLoadError(exc.message, selected[-1]) from None
    model_config.validate(config)
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        raise ModelLoadError(f"model '{config.name}': dynamic_batching needs max_batch_size > 0")
    model_config.report_unsupported(config)
    parse_version_weights(config)  # a malformed split fails before anything loads
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    complete_instance_groups(config, backend)
    return config, backend, files


def complete_instance_groups(config: mc.ModelConfig, backend: Backend) -> None:
    """Resolve instance groups as Triton reports them: named, counted, with a concrete kind."""
    if not config.instance_group:
        config.instance_group.add(count=1)
    for index, group in enumerate(config.instance_group):
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = (
                mc.ModelInstanceGroup.KIND_GPU
                if backend.has_gpu()
                else mc.ModelInstanceGroup.KIND_CPU
            )
        elif group.kind == mc.ModelInstanceGroup.KIND_MODEL:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
        if group.count == 0:
            group.count = 1
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.kind == mc.ModelInstanceGroup.KIND_GPU and not group.gpus:
            # As in Triton: a GPU group that names no GPUs has ``count`` instances on each.
            group.gpus.extend(range(backend.gpu_count()) or [0])


def group_placements(group: mc.ModelInstanceGroup) -> list[Placement]:
    """One placement per device of a (completed) instance group; ``count`` instances go on
    each."""
    devices = group.gpus if group.kind == mc.ModelInstanceGroup.KIND_GPU else [0]
    return [Placement(group.kind, device) for device in devices]


def target_of(placement: Placement) -> str:
    """The engine builder's target for a placement."""
    if placement.kind == mc.ModelInstanceGroup.KIND_GPU:
        return f"cuda:{placement.device_id}"
    return "cpu"


def memory_fraction(config: mc.ModelConfig) -> float:
    """``instance_memory_fraction``: size GPU groups to this share of free device memory."""
    text = model_config.parameter(config, "instance_memory_fraction").strip()
    if not text:
        return 0.0
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise ModelLoadError(
            f"model '{config.name}': instance_memory_fraction must be in (0, 1], got '{text}'"
        )
    return fraction


def execution_timeout_s(config: mc.ModelConfig) -> float:
    """``execution_timeout_us``: how long one execution may take before its requests fail
    and its instance is replaced (0: no limit)."""
    text = model_config.parameter(config, "execution_timeout_us", "0").strip() or "0"
    if not text.isdigit():
        raise ModelLoadError(
            f"model '{config.name}': execution_timeout_us must be a whole number of "
            f"microseconds, got '{text}'"
        )
    return int(text) / 1e6


def inline_policy(config: mc.ModelConfig, placement: Placement) -> InlinePolicy:
    """The instance's inline-execution policy from the ``inline_execution`` parameters. A
    model with an execution timeout never runs inline: an execution on the event loop's
    thread cannot be timed out, and one that hung there would stop the whole server."""
    default = "never" if placement.kind == mc.ModelInstanceGroup.KIND_GPU else "auto"
    mode = model_config.parameter(config, "inline_execution", default)
    if execution_timeout_s(config):
        mode = "never"
    threshold = model_config.parameter(config, "inline_execution_threshold_us", "100")
    try:
        return InlinePolicy(mode, threshold_ns=int(threshold) * 1000)
    except ValueError as exc:
        raise ModelLoadError(f"model '{config.name}': parameter inline_execution: {exc}") from None


def known_signature(
    config: mc.ModelConfig, backend: Backend, model_file: Path, cache: EngineCache | None
) -> object | None:
    """What the backend would read from the model file to check a config against it, as
    remembered in the cache's source facts; None without a cache."""
    if cache is None:
        return None
    return backend.remembered_signature(config, model_file, cache.facts)


def load_version(
    config: mc.ModelConfig,
    backend: Backend,
    version: int,
    model_file: Path,
    model_dir: Path,
    warmup: bool = True,
    cache: EngineCache | None = None,
) -> ModelVersion:
    """Check the config against the file, build (or fetch) its engine, then load and warm
    every instance of a version."""
    if not model_file.is_file():
        raise ModelLoadError(
            f"model '{config.name}' version {version}: model file {model_file.name} not found"
        )
    backend.check_config(config, model_file, known_signature(config, backend, model_file, cache))
    builds: dict[str, artifacts.BuiltEngine] = {}
    targets = (target_of(p) for group in config.instance_group for p in group_placements(group))
    for target in dict.fromkeys(targets):
        builds[target] = (
            artifacts.prepare(config, backend.name, version, model_file, model_dir, cache, target)
            if cache is not None
            else artifacts.BuiltEngine(model_file)
        )

    @functools.cache
    def samples() -> list[warmups.WarmupSample]:
        """The warm-up samples, made when the first instance has loaded: a model that cannot
        load (out of device memory, say) fails with that reason, before host memory goes to
        samples it would never run."""
        return warmups.samples(config, model_dir) if warmup else []

    timeout = execution_timeout_s(config)

    def make_instance(name: str, placement: Placement) -> Instance:
        started = time.perf_counter()
        built = builds[target_of(placement)]
        engine = backend.load(
            config, built.path, placement, bool(built.manifest.get("optimized", False))
        )
        instance = Instance(name, engine, placement, inline_policy(config, placement), timeout)
        loaded = time.perf_counter() - started
        try:
            instance.warmup_seconds = warmups.warm(instance, config, samples())
        except BaseException:
            instance.close()
            raise
        log.info(
            "model '%s' version %d: instance %s on %s loaded in %.3f s, warmed (%d %s) in %.3f s",
            config.name,
            version,
            name,
            placement.label,
            loaded,
            len(samples()),
            "sample" if len(samples()) == 1 else "samples",
            instance.warmup_seconds,
        )
        return instance

    fraction = memory_fraction(config)
    instances: list[Instance] = []
    memory: dict[str, int] = {}
    try:
        for group in config.instance_group:
            # Instances are numbered across the group's devices (m_0_0, m_0_1 on GPU 0,
            # m_0_2, m_0_3 on GPU 1), so each has a name of its own.
            number = 0
            sized: list[int] = []
            for placement in group_placements(group):
                count, index = group.count, 0
                free = backend.free_device_memory(placement)
                while index < count:
                    instances.append(make_instance(f"{group.name}_{number}_v{version}", placement))
                    index += 1
                    number += 1
                    if free is None or index > 1:
                        continue
                    after = backend.free_device_memory(placement) or 0
                    used = max(free - after, 1)
                    memory[placement.label] = used
                    if fraction:
                        count = max(1, min(MAX_SIZED_INSTANCES, int(fraction * free // used)))
                        log.info(
                            "model '%s' version %d: one instance takes %.1f MiB on %s; "
                            "%d instances fit in %.0f%% of its %.1f GiB free",
                            config.name,
                            version,
                            used / 2**20,
                            placement.label,
                            count,
                            fraction * 100,
                            free / 2**30,
                        )
                sized.append(count)
            if fraction and sized:
                # Reported as Triton reports the group: instances per GPU (each GPU was
                # sized from its own free memory; the group reports what each holds at least).
                group.count = min(sized)
    except BaseException:
        for instance in instances:
            instance.close()
        release_freed_memory()
        raise
    supervisor = InstanceSupervisor(
        f"model '{config.name}' version {version}", instances, make_instance
    )
    model_version = ModelVersion(config, version, scheduler_for(config, str(version), supervisor))
    model_version.engine = next(iter(builds.values()))
    model_version.instance_memory = memory
    if samples():
        model_version.warmup_inputs = samples()[0].inputs
    return model_version


def load_model(
    location: ModelLocation,
    strict: bool,
    override: mc.ModelConfig | None = None,
    warmup: bool = True,
    cache: EngineCache | None = None,
    serving: Mapping[int, ModelVersion] | None = None,
) -> LoadedModel:
    """Load every version the policy serves; one failing version does not stop the others.

    A version in ``serving`` whose files and config are unchanged is kept as it is, so a
    reload that adds a version or changes only routing loads nothing twice.
    """
    config, backend, files = prepare_config(location, strict, override, cache)
    versions: dict[int, ModelVersion] = {}
    failures: dict[int, str] = {}
    kept: set[int] = set()
    for version, path in files.items():
        identity = version_identity(location.path, version, config)
        current = (serving or {}).get(version)
        if current is not None and current.identity == identity:
            current.config = config  # differs at most in version policy and routing
            versions[version] = current
            kept.add(version)
            continue
        try:
            loaded = load_version(config, backend, version, path, location.path, warmup, cache)
        except ModelLoadError as exc:
            failures[version] = exc.message
            log.error("%s", exc.message)
            continue
        loaded.identity = identity
        versions[version] = loaded
    return LoadedModel(config, versions, failures, frozenset(kept))
