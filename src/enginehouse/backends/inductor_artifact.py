"""GPU engines saved as standalone Inductor artifacts: compiled code and kernels, no tracing
on load.

``torch.compile`` re-runs Dynamo and AOTAutograd on every start even when every kernel is in
the cache (10 s for ResNet-50); AOTInductor packages would load at once but crash the process
when loaded for CUDA with torch 2.11 on CUDA 13. ``torch._inductor.standalone_compile``
compiles the exported program's own graph, with its weights lifted to inputs and the batch
dimension symbolic as export left it, and saves the result whole. Loading it is reading the
generated module and its kernels; the weights are a separate file, read straight onto the
device.

The generated code names the GPU it was compiled for, so an artifact serves that device
only: the engine cache already builds one entry per device (the target is in its key).

Beside it, an engine may hold artifacts compiled with the batch fixed (``inductor-b256.art``,
listed in ``static_batches.json``; builder/static_batches.py decides which are kept). They
take the same weights, and the runner calls the one made for a call's batch where there is
one: a CUDA graph captured for that bucket then replays the specialised kernels.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from enginehouse.backends import cudnn_fused
from enginehouse.errors import ModelLoadError

ARTIFACT = "inductor.art"
WEIGHTS = "weights.pt"
# Which fixed-batch artifacts an engine holds: {"kept": {"256": {...}}, "refused": {...}}.
STATIC_INDEX = "static_batches.json"


class Unsupported(Exception):
    """The program cannot be compiled standalone (the caller falls back to torch.compile)."""


def static_name(batch: int) -> str:
    """The file of the artifact compiled for ``batch`` rows."""
    return f"inductor-b{batch}.art"


class ArtifactRunner:
    """Calls the compiled graph with its weights first, as the lifted graph takes them: the
    graph compiled for the call's batch where there is one (``by_batch``), else the one of
    symbolic batch."""

    def __init__(
        self, artifact: Any, weights: list[Any], by_batch: dict[int, Any] | None = None
    ) -> None:
        self._artifact = artifact
        self._weights = weights
        self.by_batch = by_batch or {}

    def __call__(self, *inputs: Any) -> Any:
        artifact = (
            self.by_batch.get(inputs[0].shape[0], self._artifact)
            if self.by_batch
            else self._artifact
        )
        return artifact(*self._weights, *inputs)


def lifted_weights(torch: Any, exported: Any) -> dict[str, Any]:
    """The tensors that the program's graph takes before its user inputs, in call order."""
    from torch.export.graph_signature import InputKind, OutputKind

    signature = exported.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs):
        raise Unsupported("the program mutates its buffers (returns them updated)")
    kinds = [spec.kind for spec in signature.input_specs]
    users = kinds.count(InputKind.USER_INPUT)
    if any(kind != InputKind.USER_INPUT for kind in kinds[len(kinds) - users :]):
        raise Unsupported("the program's graph takes its inputs between its weights")
    state = {**exported.state_dict, **exported.constants}
    weights: dict[str, Any] = {}
    for spec in signature.input_specs[: len(kinds) - users]:
        tensor = state.get(spec.target) if spec.target is not None else None
        if not isinstance(tensor, torch.Tensor):
            raise Unsupported(f"the program takes a {spec.kind.name.lower()} input")
        weights[spec.target] = tensor.detach()
    return weights


def save(
    torch: Any,
    exported: Any,
    autotune: bool,
    out: Path,
    checks: tuple[tuple[Any, ...], ...] = (),
    channels_last: bool = False,
) -> ArtifactRunner:
    """Compile ``exported`` (on its device) standalone; write ``out/inductor.art`` and
    ``out/weights.pt``; return the compiled runner. The runner must take each input tuple
    in ``checks`` (one row where the model batches, say): a graph that Inductor
    specialised to the traced shapes is refused rather than saved.

    ``channels_last`` (a GPU program of convolutions, as the builder converted it) forces
    Inductor's layout optimisation, which it turns off for convolutions with a symbolic
    batch (pytorch#102670): ResNet-50 fp16 at batch 256 on an H100 ran 23,706/s with it
    against 22,922/s (standalone artifacts, one process, twice; static shapes 24,837/s).
    Across machines the built engine's ratio to eager varies by more than that gain."""
    weights = lifted_weights(torch, exported)
    artifact = _compile(torch, exported, autotune, channels_last)
    runner = ArtifactRunner(artifact, list(weights.values()))
    with torch.no_grad():
        for inputs in checks:
            try:
                runner(*inputs)
            except Exception as exc:  # Inductor's shape asserts
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise Unsupported(
                    f"the compiled graph refuses inputs of {shapes}: {message}"
                ) from None
    artifact.save(path=str(out / ARTIFACT), format="binary")
    torch.save(weights, str(out / WEIGHTS))
    return runner


def _compile(torch: Any, exported: Any, autotune: bool, channels_last: bool) -> Any:
    """Inductor's standalone compile of ``exported``'s graph, its weights lifted to inputs."""
    options = {"max_autotune": True} if autotune else {}
    # Compile against export's own fake inputs and shape environment: the batch keeps the
    # symbol and range export gave it (or the size a fixed-batch export fixed) and the
    # weights stay static. (Fresh symbols for real inputs would make every weight dim
    # symbolic too, and by default tie equal sizes, such as BERT's 2 token types and a batch
    # traced at 2, to one symbol.)
    placeholders = [node.meta["val"] for node in exported.graph.nodes if node.op == "placeholder"]
    context = torch._guards.TracingContext(torch._guards.detect_fake_mode(placeholders))
    layout = (
        torch._inductor.config.patch(force_layout_optimization=True)
        if channels_last
        else nullcontext()
    )
    with torch.no_grad(), torch._guards.tracing(context), layout:
        return torch._inductor.standalone_compile(
            exported.graph_module,
            placeholders,
            dynamic_shapes="from_tracing_context",
            options=options,
        )


def compile_static(
    torch: Any, exported: Any, weights: dict[str, Any], autotune: bool, channels_last: bool
) -> Any:
    """The artifact of ``exported``, a program of the same module exported with its batch
    fixed, checked to lift the same weights in the same order as the engine's (``weights``,
    by name): the engine's runner passes those to every artifact it holds."""
    lifted = lifted_weights(torch, exported)
    if list(lifted) != list(weights) or any(
        lifted[name].shape != tensor.shape or lifted[name].dtype != tensor.dtype
        for name, tensor in weights.items()
    ):
        raise Unsupported("the fixed-batch program lifts other weights than the engine's")
    return _compile(torch, exported, autotune, channels_last)


def save_static(artifact: Any, batch: int, out: Path) -> None:
    """Write a kept fixed-batch artifact beside the engine's own."""
    artifact.save(path=str(out / static_name(batch)), format="binary")


def write_static_index(out: Path, kept: dict[int, Any], refused: dict[int, Any]) -> None:
    """Record which fixed-batch artifacts the engine holds, with what was measured."""
    document = {
        "kept": {str(batch): facts for batch, facts in sorted(kept.items())},
        "refused": {str(batch): facts for batch, facts in sorted(refused.items())},
    }
    (out / STATIC_INDEX).write_text(json.dumps(document, indent=1) + "\n")


def static_batches(folder: Path) -> list[int]:
    """The batch sizes that the engine in ``folder`` has fixed-batch artifacts for."""
    index = folder / STATIC_INDEX
    if not index.is_file():
        return []
    return sorted(int(batch) for batch in json.loads(index.read_text()).get("kept", {}))


def load(torch: Any, path: Path, device: str, model: str) -> ArtifactRunner:
    """The artifact at ``path``, those beside it of fixed batch, and their weights, read
    onto ``device``."""
    cudnn_fused.register(torch)  # the builder may have fused the program's convolutions
    try:
        weights = torch.load(
            str(path.with_name(WEIGHTS)), map_location=device, mmap=True, weights_only=True
        )
        artifact = torch._inductor.CompiledArtifact.load(path=str(path), format="binary")
        by_batch = {
            batch: torch._inductor.CompiledArtifact.load(
                path=str(path.with_name(static_name(batch))), format="binary"
            )
            for batch in static_batches(path.parent)
        }
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # unpickling and Inductor's loaders raise many types
        raise ModelLoadError(f"model '{model}': cannot load the compiled engine: {exc}") from None
    return ArtifactRunner(artifact, list(weights.values()), by_batch)
