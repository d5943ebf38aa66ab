"""Training speed of celebgen's models as a fraction of this machine's matmul peak, measured in one run.

    python tests/benchmark_speed.py                       # tiny@32 and small@64, fp32 and bf16
    python tests/benchmark_speed.py --configs tiny:32:4 --batch_size 64
    python tests/benchmark_speed.py --sdpa                # also PyTorch's flash-attention kernel on CPU

Prints, per (model, image size, precision): images/s of full training steps (forward, backward, AdamW,
EMA; data already in memory), model TFLOP/s by celebgen.flops_per_image, and that as a share of the
peak of a large square matmul of the same dtype measured at the start of the same run.
"""
import argparse
import copy
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen as cg  # noqa: E402


def matmul_peak(dtype, n=2048, seconds=3.0):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def training_speed(model_name, image_size, patch_size, precision, batch_size, seconds, sdpa):
    args = argparse.Namespace(model=model_name, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(0)
    model = cg.build_model(args)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x1 = torch.randn(batch_size, 3, image_size, image_size)
    device = torch.device("cpu")

    def step(i):
        x0, t = torch.randn_like(x1), torch.rand(batch_size)
        with cg.autocast(device, precision):
            loss = cg.flow_loss(model, x1, x0, t, 0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        cg.update_ema(ema, model, i, 0.9999)

    with cg.attention_kernels(device) if not sdpa else nullcontext():
        for i in range(3):
            step(i)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step(count)
            count += 1
    images_per_sec = count * batch_size / (time.perf_counter() - start)
    return images_per_sec, images_per_sec * cg.flops_per_image(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny:32:4", "small:64:4"], help="model:image_size:patch")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per configuration")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sdpa", action="store_true", help="also time PyTorch's default (flash) attention kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precisions}
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for p, peak in peaks.items():
        print(f"matmul peak {p}: {peak / 1e9:.0f} GFLOP/s (2048x2048)")
    print(f"{'model':>6} {'size':>4} {'prec':>5} {'attention':>9} {'img/s':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for config in args.configs:
        name, size, patch = config.split(":")
        for p in args.precisions:
            for sdpa in [False, True] if args.sdpa else [False]:
                ips, flops = training_speed(name, int(size), int(patch), p, args.batch_size, args.seconds, sdpa)
                print(f"{name:>6} {size:>4} {p:>5} {'flash' if sdpa else 'math':>9} {ips:8.1f} {flops / 1e9:8.1f} "
                      f"{flops / peaks[p]:8.1%}", flush=True)


if __name__ == "__main__":
    main()
