"""What one decision costs when the sequence is split over ranks (context parallelism), against one process.

    python bench/bench_parallel.py                  # CPU: gloo on loopback, 2 ranks
    python bench/bench_parallel.py --device cuda    # one process per GPU, NCCL (needs >= --world GPUs)

A FLUX-sized signal (1 x 4096 x 3072 bf16 at 1024px) is decided on: one process on the whole signal (the fused
`teacache::decide`), and `--world` ranks each on its 1/world slice, where the decision is split in two with the
sum between (`partial_sums` -> `parallel.sum_over_ranks` (an all-gather of 3 float64) -> `decide_finish`).
Median seconds per call, eager and `torch.compile`d, each rank timing its own calls after a barrier; the
slowest rank is reported. Rows are appended to bench/results/parallel.csv with the hardware named.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, hardware, print_table, versions  # noqa: E402

TOKENS, WIDTH = 4096, 3072


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    import functools

    import torch.distributed as dist

    from teacache_kernels import parallel
    from teacache_kernels import state as S
    from teacache_kernels.config import ResolvedConfig, TeaCacheConfig
    from teacache_kernels.ops.decide import decide

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = f"cuda:{rank}" if cuda else "cpu"
    g = torch.Generator().manual_seed(rank)
    signals = [torch.randn(1, TOKENS // world, WIDTH, generator=g).to(device, torch.bfloat16) for _ in range(2)]
    config = ResolvedConfig.resolve(TeaCacheConfig(rel_l1_thresh=0.4, num_inference_steps=1_000_000), "flux")
    st = S.ContextState("bench")
    st.allocate(signals[0], signals[0], config)
    over = None if world == 1 else functools.partial(parallel.sum_over_ranks, group=dist.group.WORLD)

    def step(signal):
        return decide(signal, st.prev_signal, st.scalars, st.config, st.log, st.partials, st.ticket, over)

    results = {}
    for mode, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True))):
        for i in range(3):  # warm-up (compiles)
            fn(signals[i % 2])
        samples = []
        for i in range(args.repeats):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            reuse = fn(signals[i % 2])
            reuse.item()  # the flag on the host: what the next step's branch waits for  # host-ok: timing
            samples.append(time.perf_counter() - start)
        results[mode] = statistics.median(samples)
    torch.save(results, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, _free_port(), args, out), nprocs=world, start_method="spawn")
        per_rank = [torch.load(Path(out) / f"{r}.pt") for r in range(world)]
    return {mode: max(r[mode] for r in per_rank) for mode in per_rank[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.world < 2:
        p.error(f"--world must be at least 2, got {args.world}")
    if TOKENS % args.world:
        p.error(f"--world must divide {TOKENS} tokens, got {args.world}")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        p.error(f"--world {args.world} needs as many GPUs; {torch.cuda.device_count()} visible")
    os.environ.setdefault("TRITON_INTERPRET", "0")

    single, split = run(1, args), run(args.world, args)
    hw = hardware(args.device)
    rows = []
    for mode in single:
        rows.append({"hardware": hw, "mode": mode, "signal": f"1x{TOKENS}x{WIDTH} bf16", "world": args.world,
                     "one_process_us": round(single[mode] * 1e6, 1), "split_us": round(split[mode] * 1e6, 1),
                     "split_over_one": round(split[mode] / single[mode], 2), **versions()})  # fmt: skip
    print(f"decision per call, {hw}")
    print_table(rows, ["mode", "world", "one_process_us", "split_us", "split_over_one"])
    if not args.no_save:
        print(f"appended to {append_csv('parallel', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
