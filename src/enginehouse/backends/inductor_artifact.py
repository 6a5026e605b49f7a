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
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from enginehouse.errors import ModelLoadError

ARTIFACT = "inductor.art"
WEIGHTS = "weights.pt"


class Unsupported(Exception):
    """The program cannot be compiled standalone (the caller falls back to torch.compile)."""


class ArtifactRunner:
    """Calls the compiled graph with its weights first, as the lifted graph takes them."""

    def __init__(self, artifact: Any, weights: list[Any]) -> None:
        self._artifact = artifact
        self._weights = weights

    def __call__(self, *inputs: Any) -> Any:
        return self._artifact(*self._weights, *inputs)


def _lifted_weights(torch: Any, exported: Any) -> dict[str, Any]:
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
    weights = _lifted_weights(torch, exported)
    options = {"max_autotune": True} if autotune else {}
    # Compile against export's own fake inputs and shape environment: the batch keeps the
    # symbol and range export gave it and the weights stay static. (Fresh symbols for
    # real inputs would make every weight dim symbolic too, and by default tie equal
    # sizes, such as BERT's 2 token types and a batch traced at 2, to one symbol.)
    placeholders = [node.meta["val"] for node in exported.graph.nodes if node.op == "placeholder"]
    context = torch._guards.TracingContext(torch._guards.detect_fake_mode(placeholders))
    layout = (
        torch._inductor.config.patch(force_layout_optimization=True)
        if channels_last
        else nullcontext()
    )
    with torch.no_grad(), torch._guards.tracing(context), layout:
        artifact = torch._inductor.standalone_compile(
            exported.graph_module,
            placeholders,
            dynamic_shapes="from_tracing_context",
            options=options,
        )
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


def load(torch: Any, path: Path, device: str, model: str) -> ArtifactRunner:
    """The artifact at ``path`` and its weights, read onto ``device``."""
    try:
        weights = torch.load(
            str(path.with_name(WEIGHTS)), map_location=device, mmap=True, weights_only=True
        )
        artifact = torch._inductor.CompiledArtifact.load(path=str(path), format="binary")
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # unpickling and Inductor's loaders raise many types
        raise ModelLoadError(f"model '{model}': cannot load the compiled engine: {exc}") from None
    return ArtifactRunner(artifact, list(weights.values()))
