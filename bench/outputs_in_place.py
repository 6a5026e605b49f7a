"""A large output's way into a mapped shared-memory region: copied there after the run, or
written there by the run itself (ONNX Runtime's I/O binding, ``backends/output_binding.py``).

The identity model of ``--elements`` FP32 values (1 MB by default) runs on one ONNX Runtime
thread; each execution's output goes into one of 8 regions in turn (as perf_analyzer's 8
concurrent requests use 8), through the server's own code: ``SharedMemoryRegions.write``
after a plain run, against ``output_targets`` and a bound run. CPU time per execution of
each, in alternating rounds (the machine's drift reaches both alike); the median round.

    python bench/outputs_in_place.py [--elements 262144] [--rounds 6] [--runs 800]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_triton import identity_model

from enginehouse.backends.output_binding import OutputBinding
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.messages import HostOutput, SharedMemoryTarget

REGIONS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=262144)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=800)
    args = parser.parse_args()
    size = args.elements * 4
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        identity_model(args.elements).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    config = text_format.Parse(
        f'name: "identity" max_batch_size: 8 '
        f'output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [{args.elements}] }}]',
        mc.ModelConfig(),
    )
    binding = OutputBinding.of(config, session)
    assert binding is not None
    regions = SharedMemoryRegions(mapped=True)
    keys = []
    for index in range(REGIONS):
        key = f"/eh_bench_{uuid.uuid4().hex[:8]}"
        fd = os.open(f"/dev/shm{key}", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        regions.register(f"r{index}", key, 0, size)
        keys.append(key)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, args.elements)).astype(np.float32) for _ in range(REGIONS)]
    targets = [SharedMemoryTarget(f"r{index}", 0, size) for index in range(REGIONS)]
    native = session._sess

    def copied(index: int) -> None:
        (output,) = native.run(["OUTPUT0"], {"INPUT0": inputs[index]}, None)
        regions.write(targets[index], output, "OUTPUT0")

    def in_place(index: int) -> None:
        found = regions.output_targets({"OUTPUT0": targets[index]})
        assert found is not None and isinstance(found["OUTPUT0"], HostOutput)
        feeds = {"INPUT0": inputs[index]}
        outputs = binding.outputs_in(feeds, ["OUTPUT0"], {"OUTPUT0": found["OUTPUT0"]})
        assert outputs is not None
        binding.run(feeds, ["OUTPUT0"], outputs, None)

    ways: dict[str, Callable[[int], None]] = {
        "copied after the run": copied,
        "written in place": in_place,
    }
    spent: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(ways)[::-1]
            for name in order:
                run = ways[name]
                for index in range(2 * REGIONS):
                    run(index % REGIONS)
                started = time.process_time()
                for index in range(args.runs):
                    run(index % REGIONS)
                spent[name].append((time.process_time() - started) / args.runs * 1e6)
                print(f"  round {round_ + 1} {name}: {spent[name][-1]:.0f} us", flush=True)
    finally:
        regions.close()
        for key in keys:
            os.unlink(f"/dev/shm{key}")
    medians = {name: statistics.median(times) for name, times in spent.items()}
    print(f"\n{'output':22} {'CPU us per execution':>21} {'rounds':>24}")
    for name, times in spent.items():
        print(f"{name:22} {medians[name]:21.0f} {' '.join(f'{t:.0f}' for t in times):>24}")
    copy, place = medians["copied after the run"], medians["written in place"]
    print(
        f"outputs_in_place: {size / 2**20:.2f} MB output, copied {copy:.0f} us, in place "
        f"{place:.0f} us, {copy - place:.0f} us saved per execution"
    )


if __name__ == "__main__":
    main()
