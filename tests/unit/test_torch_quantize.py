"""Lifting an exported program's linear calls into nn.Linear modules (what torchao quantises)."""

from __future__ import annotations

from pathlib import Path

import pytest

from enginehouse.backends.torch_quantize import lift_linears
from enginehouse.builder import torch_builder
from enginehouse.config.build_spec import BuildSpec
from enginehouse.errors import ModelLoadError

torch = pytest.importorskip("torch")


def exported_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0).eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(layer, (torch.randn(2, 5, 32),), dynamic_shapes=({0: batch},))
    return program.module()


def test_lift_linears_keeps_outputs_and_weights_once() -> None:
    module = exported_encoder()
    x = torch.randn(3, 5, 32)
    before = module(x)
    count = sum(p.numel() for p in module.parameters())
    # in-projection, out-projection and the two feed-forward layers
    assert lift_linears(torch, module) == 4
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4
    torch.testing.assert_close(module(x), before, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in module.parameters()) == count  # no second copy left behind
    assert not any(
        n.op == "call_function" and n.target == torch.ops.aten.linear.default
        for n in module.graph.nodes
    )


def test_lift_linears_leaves_computed_weights_alone() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.weight * 2)

    module = torch.export.export(Tied().eval(), (torch.randn(2, 8),)).module()
    assert lift_linears(torch, module) == 0


def test_quantized_precisions_need_the_cuda_target(tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name="m", max_batch_size=4)
    spec = BuildSpec(backend="pytorch", precision="fp8", target="cpu")
    source = tmp_path / "model.pt2"
    source.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="fp8 PyTorch engines are built for the cuda target"):
        torch_builder._build(source, config, spec, tmp_path, tmp_path)


def test_rows_at_batch_one_counts_every_leading_dim() -> None:
    from enginehouse.backends.torch_quantize import rows_at_batch_one

    module = exported_encoder()
    lift_linears(torch, module)
    rows = rows_at_batch_one(torch, module, [torch.zeros(1, 5, 32)])
    assert sorted(rows.values()) == [5, 5, 5, 5]  # one request of 5 tokens
