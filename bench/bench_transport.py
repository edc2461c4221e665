"""One actor-to-actor hop on the CPU, for each way a clip can travel, against a plain memcpy.

    python bench/bench_transport.py [--sizes-mib 64 300] [--runs 5]

Two actors on one local Ray node: the producer holds the payload (made before the timing), the
consumer reads its last element, so the data has arrived. A hop is the wall time from submitting the
producer's call to the consumer's answer, the median of `--runs` after one warm-up:

- numpy through the object store: the producer returns a numpy array (what the cascade does on CPUs);
- torch through the object store: the same bytes as a torch tensor;
- direct over gloo: Ray Direct Transport, the producer's method annotated `tensor_transport="gloo"`,
  the tensor sent over a gloo group of the two actors (the CPU variant of the NCCL path);
- memcpy: copying the same bytes once within one process (numpy's copy), the floor.

300 MiB is about a 480p, 81-frame clip after ×3 interpolation (241 × 480 × 832 × 3 bytes = 289 MiB).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray
import torch

MiB = 2**20


@ray.remote
class Producer:
    def make(self, size: int) -> None:
        self.array = np.ones(size, dtype=np.uint8)
        self.tensor = torch.from_numpy(self.array)

    def numpy(self):
        return self.array

    def torch(self):
        return self.tensor

    @ray.method(tensor_transport="gloo")
    def direct(self):
        return self.tensor.view(-1)  # a new tensor object on the same memory: RDT tracks each one it sends


@ray.remote(enable_tensor_transport=True)  # a thread to receive on while `read` waits for its argument
class Consumer:
    def read(self, payload) -> int:
        return int(payload[-1])


def median_seconds(function, runs: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 300])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from ray.experimental.collective import create_collective_group

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        producer, consumer = Producer.remote(), Consumer.remote()
        create_collective_group([producer, consumer], backend="torch_gloo")
        print("| transport | " + " | ".join(f"{size} MiB (ms)" for size in args.sizes_mib) + " | "
              + " | ".join(f"{size} MiB / memcpy" for size in args.sizes_mib) + " |")
        print("|---|" + "---|" * 2 * len(args.sizes_mib))
        rows: dict[str, list[float]] = {"memcpy": [], "numpy through the object store": [],
                                        "torch through the object store": [], "direct over gloo (RDT)": []}
        for size in args.sizes_mib:
            ray.get(producer.make.remote(size * MiB))
            source = np.ones(size * MiB, dtype=np.uint8)
            rows["memcpy"].append(median_seconds(lambda: source.copy(), args.runs))
            for name, method in (("numpy through the object store", producer.numpy),
                                 ("torch through the object store", producer.torch),
                                 ("direct over gloo (RDT)", producer.direct)):
                rows[name].append(median_seconds(lambda: ray.get(consumer.read.remote(method.remote())), args.runs))
        for name, times in rows.items():
            ratios = [hop / memcpy for hop, memcpy in zip(times, rows["memcpy"])]
            print(f"| {name} | " + " | ".join(f"{1000 * seconds:.0f}" for seconds in times) + " | "
                  + " | ".join(f"{ratio:.1f}" for ratio in ratios) + " |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
