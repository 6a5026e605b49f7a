"""Standalone Inductor artifacts: compiled once with a symbolic batch, saved with their
weights apart, loaded without tracing (here on the CPU; tests/gpu serves them on CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from enginehouse.backends import inductor_artifact
from enginehouse.errors import ModelLoadError
from tests.models import torch_convnet

torch = pytest.importorskip("torch")


def _exported(module: torch.nn.Module) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=16)
    example = (torch.randn(2, 3, 16, 16),)
    return torch.export.export(module, example, dynamic_shapes=({0: batch},))


def test_saved_artifact_loads_and_serves_every_batch(tmp_path: Path) -> None:
    module = torch_convnet(8)
    program = _exported(module)
    built = inductor_artifact.save(torch, program, False, tmp_path)
    assert (tmp_path / inductor_artifact.ARTIFACT).stat().st_size > 0
    weights = torch.load(tmp_path / inductor_artifact.WEIGHTS, weights_only=True)
    # Weights are kept apart from the code, once each, without autograd state.
    assert sum(t.numel() for t in weights.values()) == sum(p.numel() for p in module.parameters())
    assert not any(t.requires_grad for t in weights.values())

    loaded = inductor_artifact.load(torch, tmp_path / inductor_artifact.ARTIFACT, "cpu", "m")
    with torch.inference_mode():
        for batch in (1, 3, 16):  # batch 1 too: export's symbolic batch starts at 1
            x = torch.randn(batch, 3, 16, 16)
            (got,) = loaded(x)
            assert got.shape == (batch, 10)
            torch.testing.assert_close(got, module(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(built(x)[0], got)


def test_programs_that_update_buffers_are_refused(tmp_path: Path) -> None:
    class Counter(torch.nn.Module):
        """Counts its calls in a buffer: state that a standalone graph would not keep."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.add_(1)
            return x + self.calls

    # Decomposed, the graph returns the updated buffer beside the output.
    program = torch.export.export(Counter(), (torch.randn(2, 4),)).run_decompositions()
    with pytest.raises(inductor_artifact.Unsupported, match="mutates its buffers"):
        inductor_artifact.save(torch, program, False, tmp_path)
    assert not (tmp_path / inductor_artifact.ARTIFACT).exists()


def test_a_damaged_artifact_is_a_clear_load_error(tmp_path: Path) -> None:
    program = _exported(torch_convnet(4))
    inductor_artifact.save(torch, program, False, tmp_path)
    path = tmp_path / inductor_artifact.ARTIFACT
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="model 'm': cannot load the compiled engine"):
        inductor_artifact.load(torch, path, "cpu", "m")


def test_a_graph_specialised_to_its_example_is_refused(tmp_path: Path) -> None:
    # Exported without a dynamic batch: the compiled graph asserts batch 2.
    program = torch.export.export(torch_convnet(4), (torch.randn(2, 3, 16, 16),))
    one_row = (torch.randn(1, 3, 16, 16),)
    with pytest.raises(inductor_artifact.Unsupported, match=r"refuses inputs of \(1, 3, 16, 16\)"):
        inductor_artifact.save(torch, program, False, tmp_path, checks=(one_row,))
    assert not (tmp_path / inductor_artifact.ARTIFACT).exists()


def test_weights_sized_like_the_example_batch_do_not_fix_the_batch(tmp_path: Path) -> None:
    class TokenTypes(torch.nn.Module):
        """BERT's pattern: a 2-row embedding looked up by ids expanded to the batch."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.types = torch.nn.Embedding(2, 8)
            self.register_buffer("type_ids", torch.zeros(1, 16, dtype=torch.int64))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            batch, length = ids.shape
            types = self.type_ids[:, :length].expand(batch, length)
            return self.types(types).sum(-1) + ids

    batch = torch.export.Dim("batch", min=1, max=16)
    example = (torch.zeros(2, 16, dtype=torch.int64),)  # the builder traces at batch 2
    program = torch.export.export(TokenTypes().eval(), example, dynamic_shapes=({0: batch},))
    one_row = (torch.ones(1, 16, dtype=torch.int64),)
    runner = inductor_artifact.save(torch, program, False, tmp_path, checks=(one_row,))
    for rows in (1, 5):
        ids = torch.arange(rows * 16).reshape(rows, 16)
        torch.testing.assert_close(runner(ids)[0], program.module()(ids))


def test_the_runner_calls_the_artifact_made_for_the_calls_batch() -> None:
    def symbolic(*args: torch.Tensor) -> str:
        return "symbolic"

    def fixed(*args: torch.Tensor) -> str:
        return "fixed"

    runner = inductor_artifact.ArtifactRunner(symbolic, [torch.ones(1)], {4: fixed})
    assert runner(torch.zeros(4, 3)) == "fixed"
    assert runner(torch.zeros(3, 3)) == "symbolic"


def test_a_fixed_batch_artifact_loads_beside_the_symbolic_one(tmp_path: Path) -> None:
    module = torch_convnet(8)
    inductor_artifact.save(torch, _exported(module), False, tmp_path)
    weights = inductor_artifact.lifted_weights(torch, _exported(module))
    fixed = torch.export.export(module, (torch.randn(4, 3, 16, 16),))
    artifact = inductor_artifact.compile_static(torch, fixed, weights, False, False)
    inductor_artifact.save_static(artifact, 4, tmp_path)
    inductor_artifact.write_static_index(
        tmp_path, {4: {"static_ms": 1.0}}, {8: {"reason": "not 2% faster"}}
    )
    assert inductor_artifact.static_batches(tmp_path) == [4]

    loaded = inductor_artifact.load(torch, tmp_path / inductor_artifact.ARTIFACT, "cpu", "m")
    assert sorted(loaded.by_batch) == [4]
    with torch.inference_mode():
        for batch in (4, 3):
            x = torch.randn(batch, 3, 16, 16)
            torch.testing.assert_close(loaded(x)[0], module(x), rtol=1e-4, atol=1e-4)


def test_a_fixed_batch_program_of_other_weights_is_refused() -> None:
    weights = inductor_artifact.lifted_weights(torch, _exported(torch_convnet(8)))
    other = torch.export.export(torch_convnet(4), (torch.randn(4, 3, 16, 16),))
    with pytest.raises(inductor_artifact.Unsupported, match="other weights"):
        inductor_artifact.compile_static(torch, other, weights, False, False)
