"""The GPU benchmarks' models, with random weights (nothing is downloaded).

ResNet-50 (torchvision) at 224x224 and a BERT-base encoder (transformers' BertModel from its
default config) at sequence 128, returning the [CLS] embedding. Each is exported with
torch.export into a model repository folder with a config.pbtxt for the pytorch backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

SEQUENCE = 128


@dataclass(frozen=True, slots=True)
class BenchModel:
    """A model, its example inputs per batch size, and its config.pbtxt's tensor lines."""

    name: str
    max_batch_size: int
    tensors: str  # input/output sections of config.pbtxt
    # The network (``resnet50``, ``bert``) where the name is a variant's.
    network: str = ""
    # The NumPy type of the image as the config declares it (``float16``: half the bytes
    # cross; the program stays fp32 and the engine takes the narrow image as it is).
    image_dtype: str = "float32"

    @property
    def kind(self) -> str:
        return self.network or self.name

    def module(self) -> Any:
        import torch

        torch.manual_seed(0)
        if self.kind == "resnet50":
            import torchvision

            return torchvision.models.resnet50(weights=None).eval()
        from transformers import BertConfig, BertModel

        class Cls(torch.nn.Module):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel(BertConfig(), add_pooling_layer=False).eval()

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)
                return hidden.last_hidden_state[:, 0]

        return Cls().eval()

    def inputs(self, batch: int, seed: int = -1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch if seed < 0 else 1000 + seed)
        if self.kind == "resnet50":
            return {"image": rng.standard_normal((batch, 3, 224, 224)).astype(self.image_dtype)}
        return {
            "input_ids": rng.integers(1000, 30000, (batch, SEQUENCE)).astype(np.int64),
            "attention_mask": np.ones((batch, SEQUENCE), np.int64),
        }

    def write(self, root: Path, config_extra: str) -> Path:
        """Export into ``root/<name>/1/model.pt2`` (once) and write its config.pbtxt."""
        import torch

        folder = root / self.name
        program = folder / "1" / "model.pt2"
        if not program.is_file():
            program.parent.mkdir(parents=True, exist_ok=True)
            example = tuple(
                torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a)
                for a in self.inputs(2).values()
            )
            batch = torch.export.Dim("batch", min=1, max=self.max_batch_size)
            dynamic = tuple({0: batch} for _ in example)
            exported = torch.export.export(self.module(), example, dynamic_shapes=dynamic)
            torch.export.save(exported, str(program))
        # Real inputs for the accuracy gate: random token ids with a full attention mask (the
        # gate's default zeros would mask every token, a case the model does not define).
        calibration = folder / "calibration"
        calibration.mkdir(exist_ok=True)
        for seed in range(4):
            np.savez(calibration / f"sample{seed}.npz", **self.inputs(1, seed))
        (folder / "config.pbtxt").write_text(
            f'backend: "pytorch"\nmax_batch_size: {self.max_batch_size}\n'
            + self.tensors
            + 'parameters { key: "engine_calibration" value: { string_value: "calibration" } }\n'
            + config_extra
        )
        return folder


RESNET50 = BenchModel(
    "resnet50",
    256,
    'input [{ name: "image" data_type: TYPE_FP32 dims: [3, 224, 224] }]\n'
    'output [{ name: "logits" data_type: TYPE_FP32 dims: [1000] }]\n',
)
BERT = BenchModel(
    "bert",
    64,
    f'input [{{ name: "input_ids" data_type: TYPE_INT64 dims: [{SEQUENCE}] }},\n'
    f'       {{ name: "attention_mask" data_type: TYPE_INT64 dims: [{SEQUENCE}] }}]\n'
    'output [{ name: "embedding" data_type: TYPE_FP32 dims: [768] }]\n',
)
RESNET50_FP16_IMAGE = replace(
    RESNET50,
    name="resnet50_fp16_image",
    network="resnet50",
    image_dtype="float16",
    tensors=RESNET50.tensors.replace("TYPE_FP32 dims: [3", "TYPE_FP16 dims: [3"),
)
MODELS = {m.name: m for m in (RESNET50, BERT, RESNET50_FP16_IMAGE)}


def gpu_config(precision: str, count: int = 1, buckets: str = "", extra: str = "") -> str:
    """config.pbtxt lines for a GPU engine of ``precision``."""
    text = (
        f"instance_group [{{ count: {count} kind: KIND_GPU gpus: [0] }}]\n"
        f'parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}\n'
    )
    if buckets:
        text += (
            'parameters { key: "cuda_graph_batch_buckets" '
            f'value: {{ string_value: "{buckets}" }} }}\n'
        )
    return text + extra
