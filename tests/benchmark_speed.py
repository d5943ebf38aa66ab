"""Training speed of celebgen's models as a fraction of this machine's matmul peak, measured in one run.

    python tests/benchmark_speed.py                       # tiny@32 and small@64 in fp32, bf16 and fp16
    python tests/benchmark_speed.py --configs tiny:32:4 --batch_size 64
    python tests/benchmark_speed.py --precisions fp32     # on a CPU where bf16/fp16 are emulated (slow)
    python tests/benchmark_speed.py --sdpa                # also PyTorch's default kernel where celebgen uses math
    python tests/benchmark_speed.py --attributes 0 40     # unconditional, and conditioned on 40 attributes
    python tests/benchmark_speed.py --plain               # also a plain DiT of the same shape, and the ratio
    python tests/benchmark_speed.py --plain --compile     # and both again under torch.compile
    python tests/benchmark_speed.py --version1            # also celebgen's network of version 1 (older checkpoints)
    python tests/benchmark_speed.py --unfused             # also AdamW unfused: the steps, and AdamW alone
    python tests/benchmark_speed.py --configs tiny:32:4 --precisions bf16 --trainer DATA_ROOT --workers 0 2
                                                          # also `celebgen.py train` on real images

Prints the machine (CPU model, PyTorch's CPU capability, the bf16-vs-fp32 matmul ratio that
`--precision auto` measures, and what auto chooses), then per (model, image size, precision): images/s
of full training steps (forward, backward, AdamW, EMA; data already in memory; the median of five
rounds, which alternate with the rounds of --plain's, --version1's and --unfused's variants), model GFLOP/s by
celebgen.flops_per_image, and that as a share of the machine's peak: the fastest of the fp32, bf16 and
fp16 2048x2048 matmul rates measured at the start of the same run (an emulated type is not timed).
With --trainer, after each in-memory measurement the real trainer runs in this process on the images
under DATA_ROOT (the image cache of ./experiments is built first if needed, outside the timing), then
the in-memory run again: the trainer's speed is the median of the images/s of its progress lines after
the first, over the mean of the in-memory runs just before and just after it (and the median of those
ratios when a --workers value is run more than once). Since a machine's speed drifts (other work on
it) between runs of half a minute, it also times the in-memory steps on the trainer's batches (from a
DataLoader over DATA_ROOT made as train_loop makes it, each --workers value once) in rounds
alternating with the in-memory ones: the cost of the data alone, measured with that drift cancelled.
"""
import argparse
import contextlib
import copy
import functools
import io
import itertools
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen as cg  # noqa: E402


DTYPES = {"fp32": torch.float32, **cg.AUTOCAST_DTYPES}


def matmul_peak(dtype, n=2048, seconds=3.0):
    """FLOP/s of an n x n matmul: one warm-up, then at least one timed call (an emulated 16-bit matmul
    takes many seconds at this size)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def cpu_model():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class PlainAttention(cg.Attention):
    """The reference's attention: that of the original DiT, with no QK-norm and no RoPE."""

    def forward(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class AddPositions(nn.Module):
    """Learned absolute position embeddings, added to the patch tokens (the original DiT's are fixed
    sin-cos; both cost the same), in the tokens' dtype: under autocast celebgen's tokens stay bf16 from
    the patch embedding on, and an fp32 parameter added to them would make every block's sums fp32."""

    def __init__(self, tokens, dim):
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(1, tokens, dim))

    def forward(self, x):
        return x + self.positions.to(x.dtype)


def plain_dit(model):
    """The same DiT made plain, for reference: absolute positions instead of RoPE, no QK-norm."""
    for block in model.blocks:
        del block.attn.q_norm, block.attn.k_norm
        block.attn.__class__ = PlainAttention
    model.patch_embed = nn.Sequential(model.patch_embed, AddPositions(model.grid**2, model.patch_embed.out_features))
    return model


class Version1Attention(cg.Attention):
    """celebgen's attention of network version 1 (ARCHITECTURE 1, older checkpoints): RMSNorm on q
    and k in fp32, RoPE on channel halves by cos and sin."""

    def forward(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q = rope_on_halves(self.q_norm(q.float()), rope).to(v.dtype)
        k = rope_on_halves(self.k_norm(k.float()), rope).to(v.dtype)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


def rope_on_halves(x, angles):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def version1_dit(model):
    """The same DiT as celebgen's network version 1 computed it: Version1Attention, DiT's tanh GELU."""
    for block in model.blocks:
        head_dim = block.attn.q_norm.normalized_shape[0]
        block.attn.q_norm, block.attn.k_norm = (nn.RMSNorm(head_dim, eps=1e-6) for _ in range(2))
        block.attn.__class__ = Version1Attention
        block.mlp[1] = nn.GELU(approximate="tanh")
    return model


def adamw(params, fused=True):
    """celebgen's training optimizer (train_loop's AdamW; its learning rate does not change the speed)."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)


def training_step(model_name, image_size, patch_size, precision, batch_size, attributes, sdpa, plain=False,
                  version1=False, compile=False, fused=True, batches=None):
    """(step, model FLOPs per image): step(i) runs training step i (forward, backward, AdamW, EMA) on data
    in memory, or on the next of `batches` (x1, x0, t, a) if given; with compile, of the model under
    torch.compile, whose first step compiles it."""
    args = argparse.Namespace(model=model_name, image_size=image_size, patch_size=patch_size,
                              attributes=cg.ATTRIBUTE_NAMES[:attributes])
    torch.manual_seed(0)
    model = cg.build_model(args)
    flops_per_image = cg.flops_per_image(model)  # the plain DiT's FLOPs differ by the norms only
    if plain:
        model = plain_dit(model)
    if version1:
        model = version1_dit(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = adamw(model.parameters(), fused)
    x1 = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(-1, 2, (batch_size, attributes)).float()  # -1, 0 or 1
    device = torch.device("cpu")
    network = torch.compile(model) if compile else model
    kernels = (contextlib.nullcontext if sdpa else
               functools.partial(cg.attention_kernels, device, (image_size // patch_size) ** 2))

    def step(i):
        x1_i, x0, t, a = (x1, torch.randn_like(x1), torch.rand(batch_size), labels) if batches is None \
            else next(batches)
        with kernels(), cg.autocast(device, precision):
            loss = cg.flow_loss(network, x1_i, x0, t, 0.05, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        cg.update_ema(ema, model, i, 0.9999)

    return step, flops_per_image


def run_for(step, seconds, first=0):
    """Steps first, first + 1, ... until `seconds` have passed (at least one): (steps, seconds taken)."""
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        step(first + count)
        count += 1
    return count, time.perf_counter() - start


def alternating_speeds(steps, batch_size, seconds, rounds=5):
    """Median images/s of each training step of `steps`, timed in `rounds` alternating rounds of
    seconds / rounds each (after one warm-up step each, whose seconds are returned too), so that a
    change of the machine's speed falls on all of them."""
    firsts = [run_for(step, 0)[1] for step in steps]
    speeds, done = [[] for _ in steps], [1] * len(steps)
    for _, (j, step) in itertools.product(range(rounds), enumerate(steps)):
        count, elapsed = run_for(step, seconds / rounds, first=done[j])
        speeds[j].append(count * batch_size / elapsed)
        done[j] += count
    return [statistics.median(s) for s in speeds], firsts


def optimizer_step_ms(model_name, image_size, patch_size, rounds=7, steps=20):
    """Median milliseconds of one AdamW step alone, unfused and fused, timed in alternating rounds so
    that a change of the machine's speed falls on both."""
    args = argparse.Namespace(model=model_name, image_size=image_size, patch_size=patch_size, attributes=[])
    model = cg.build_model(args)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = {False: [], True: []}
    opts = {fused: adamw(model.parameters(), fused) for fused in times}
    for _, fused in itertools.product(range(rounds), times):
        opts[fused].step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            opts[fused].step()
        times[fused].append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times[False]), statistics.median(times[True])


def gelu_ms(model_name, image_size, patch_size, batch_size, precision, rounds=7, steps=10):
    """Median milliseconds of the MLP's GELU alone, forward and backward, on the hidden activations of a
    batch (B * N tokens, 4D channels, in the precision's dtype): exact, and DiT's tanh approximation,
    timed in alternating rounds."""
    dim = cg.MODELS[model_name]["dim"]
    x = torch.randn(batch_size * (image_size // patch_size) ** 2, 4 * dim, dtype=DTYPES[precision])
    x.requires_grad_(True)
    grad, times = torch.randn_like(x), {"none": [], "tanh": []}
    for _, approximate in itertools.product(range(rounds), times):
        F.gelu(x, approximate=approximate).backward(grad)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            F.gelu(x, approximate=approximate).backward(grad)
        times[approximate].append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times["none"]), statistics.median(times["tanh"])


def trainer_batches(data_root, image_size, batch_size, workers):
    """Endless training batches (x1, x0, t, a) of the images under data_root, epoch after epoch, from
    a DataLoader made as train_loop makes it (one process, the image cache of ./experiments built
    first if needed)."""
    args = cg.make_parser()[1].parse_args(["--exp_name", "benchmark", "--data_root", data_root,
                                           "--image_size", str(image_size)])
    images = cg.make_dataset(args, "train")
    cg.build_cache(images)
    examples = cg.FlowExamples(images, args)
    for epoch in itertools.count():
        examples.epoch = epoch
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(epoch)).tolist()
        yield from cg.DataLoader(examples, batch_size, sampler=order, drop_last=True, num_workers=workers,
                                 worker_init_fn=cg.ignore_interrupts)


def trainer_speed(model_name, image_size, patch_size, precision, batch_size, data_root, workers, steps, compiled):
    """Median images/s of `celebgen.py train`'s progress lines (every 25 steps) after the first (with
    --compile if compiled: the first holds the compilation). The trainer runs in this process, as
    `python celebgen.py train` runs it (one process, no spawn), so that it and the in-memory steps it
    is compared with share one allocator and one set of threads."""
    exp_name = f"benchmark_trainer_{os.getpid()}"
    command = ["train", "--exp_name", exp_name, "--data_root", data_root, "--model", model_name,
               "--image_size", str(image_size), "--patch_size", str(patch_size), "--precision", precision,
               "--batch_size", str(batch_size), "--workers", str(workers), "--max_steps", str(steps),
               "--log_every", "25", "--eval_every", str(10 * steps), "--sample_every", str(10 * steps),
               "--ckpt_every", str(10 * steps)] + (["--compile"] if compiled else [])
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            cg.main(command)
    finally:
        shutil.rmtree(Path("experiments") / exp_name, ignore_errors=True)
    return statistics.median(float(x) for x in re.findall(r"([\d.]+) img/s", log.getvalue())[1:])


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_step(step, first, steps=5):
    """Where a training step's time goes: [(operator, share of the self CPU time)] over `steps` steps
    (torch.profiler), the most costly first, and the share of the matrix products."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(first + i)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    shares = [(e.key, e.self_cpu_time_total / total) for e in events]
    return shares, sum(share for name, share in shares if name in MATMUL_OPS)


VARIANT_NAMES = {"plain DiT": "the plain DiT", "version 1": "version 1", "unfused": "AdamW unfused"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny:32:4", "small:64:4"], help="model:image_size:patch")
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="autocast precisions to time")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per configuration (and per variant of it), in five rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="PyTorch threads (default: PyTorch's own count, which train keeps in one process)")
    parser.add_argument("--sdpa", action="store_true", help="also time PyTorch's default (flash) attention kernel")
    parser.add_argument("--attributes", type=int, nargs="+", default=[0],
                        help="time the model conditioned on this many attributes (0: unconditional)")
    parser.add_argument("--plain", action="store_true",
                        help="also time a plain DiT of the same shape (absolute positions, no QK-norm, no RoPE, "
                             "PyTorch's default attention kernel) in rounds alternating with celebgen's, and print "
                             "celebgen's speed over it")
    parser.add_argument("--version1", action="store_true",
                        help="also time celebgen's network of version 1 (older checkpoints: RMSNorm on q and "
                             "k, RoPE on channel halves by cos and sin, DiT's tanh GELU) in alternating rounds, "
                             "and print the speed over it; and the GELU alone, both ways")
    parser.add_argument("--unfused", action="store_true",
                        help="also time the same steps with AdamW unfused (on a CPU, PyTorch's loop over the "
                             "tensors; train uses fused=True) in alternating rounds, and print the fused speed "
                             "over it; and AdamW's step alone, both ways")
    parser.add_argument("--compile", action="store_true",
                        help="also time each model under torch.compile (its first step, which compiles, apart)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where celebgen's step spends its time: the operators with the most "
                             "self CPU time over 5 steps, and the matrix products' share and GFLOP/s")
    parser.add_argument("--trainer", metavar="DATA_ROOT",
                        help="also run `celebgen.py train` on the images under DATA_ROOT (with --compile after a "
                             "compiled in-memory run), and time the in-memory steps on its batches; print "
                             "both speeds over the in-memory one (unconditional models only)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="--workers of the trainer runs")
    parser.add_argument("--trainer_steps", type=int, default=300, help="steps of each trainer run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    auto, why = cg.resolve_precision("auto", torch.device("cpu"))
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"--precision auto -> {auto} ({why})")
    # An emulated 16-bit type (slower than fp32 at 512x512) cannot be the peak; at 2048x2048 it would
    # take minutes to time, so it is left out.
    emulated = [p for p in ("bf16", "fp16") if cg.cpu_matmul_speedup(p) < 1]
    peaks = {p: matmul_peak(DTYPES[p]) for p in DTYPES if p not in emulated}
    peak = max(peaks.values())
    print("matmul 2048x2048: " + ", ".join(f"{p} {r / 1e9:.1f} GFLOP/s" for p, r in peaks.items())
          + "".join(f", {p} emulated ({cg.cpu_matmul_speedup(p):.2f}x fp32 at 512x512)" for p in emulated)
          + f"; the peak is {max(peaks, key=peaks.get)}'s")
    print(f"{'model':>6} {'size':>4} {'precision':>9} {'attention':>9} {'attributes':>10} {'img/s':>8} "
          f"{'GFLOP/s':>8} {'of peak':>8}")
    for config in args.configs:
        name, size, patch = config.split(":")
        if args.unfused:
            ms = optimizer_step_ms(name, int(size), int(patch))
            print(f"{name:>6} {size:>4} AdamW's step alone: {ms[0]:.1f} ms unfused, {ms[1]:.1f} ms fused "
                  f"({ms[0] / ms[1]:.1f}x)", flush=True)
        for p in args.precisions:
            for sdpa in [False, True] if args.sdpa else [False]:
                for k, compiled in itertools.product(args.attributes, [False, True] if args.compile else [False]):
                    # the variants asked for, then celebgen's as train runs it, timed in alternating rounds
                    trainer = args.trainer and k == 0  # the trainer runs unconditional
                    variants = ([("plain DiT", dict(sdpa=True, plain=True))] if args.plain else []) + (
                        [("version 1", dict(sdpa=sdpa, version1=True))] if args.version1 else []) + (
                        [("unfused", dict(sdpa=sdpa, fused=False))] if args.unfused else []) + [
                        (f"loader {w}", dict(sdpa=sdpa, batches=trainer_batches(args.trainer, int(size),
                                                                                args.batch_size, w)))
                        for w in (sorted(set(args.workers)) if trainer else [])] + [("", dict(sdpa=sdpa))]
                    steps = [training_step(name, int(size), int(patch), p, args.batch_size, k, compile=compiled,
                                           **options) for _, options in variants]
                    flops_per_image = steps[-1][1]
                    steps = [step for step, _ in steps]
                    speeds, firsts = alternating_speeds(steps, args.batch_size, args.seconds)
                    note = lambda first: f"  compiled (first step {first:.0f} s)" if compiled else ""
                    for (label, _), speed, first in zip(variants[:-1], speeds, firsts):
                        loader = label.startswith("loader")
                        print(f"{name:>6} {size:>4} {p:>9} {label:>9} {k:>10} {speed:8.1f}" + note(first)
                              + (f"  the same steps on batches from the trainer's DataLoader (--workers "
                                 f"{label.split()[1]}): {speed / speeds[-1]:.2f}x in memory" if loader else ""),
                              flush=True)
                    if args.version1:
                        exact, tanh = gelu_ms(name, int(size), int(patch), args.batch_size, p)
                        print(f"{name:>6} {size:>4} {p:>9} GELU alone, forward and backward: {exact:.2f} ms exact, "
                              f"{tanh:.2f} ms tanh ({tanh / exact:.1f}x)", flush=True)
                    ips, flops = speeds[-1], speeds[-1] * flops_per_image
                    kernel = "math" if not sdpa and (int(size) // int(patch)) ** 2 <= 64 else "default"
                    print(f"{name:>6} {size:>4} {p + ('=auto' if p == auto else ''):>9} "
                          f"{kernel:>9} {k:>10} {ips:8.1f} {flops / 1e9:8.1f} {flops / peak:8.1%}"
                          + "".join(f"  {ips / speed:.2f}x {VARIANT_NAMES[label]}"
                                    for (label, _), speed in zip(variants[:-1], speeds) if label in VARIANT_NAMES)
                          + note(firsts[-1]), flush=True)
                    if args.profile:
                        shares, matmul = profile_step(steps[-1], 10**6)
                        print(f"{name:>6} {size:>4} {p:>9} profile: matrix products {matmul:.0%} of the step "
                              f"({flops / matmul / 1e9:.1f} GFLOP/s while they run, {flops / matmul / peak:.0%} "
                              f"of peak); top operators: " + ", ".join(f"{op} {share:.0%}" for op, share in shares[:8]),
                              flush=True)
                    ratios = {}
                    for workers in args.workers if trainer else []:
                        # each trainer run against the mean of the in-memory runs just before and just
                        # after it, so a drift of the machine's speed counts half on each side
                        before = ips
                        real = trainer_speed(name, int(size), int(patch), p, args.batch_size, args.trainer, workers,
                                             args.trainer_steps, compiled)
                        ips = alternating_speeds(steps[-1:], args.batch_size, args.seconds)[0][0]
                        print(f"{name:>6} {size:>4} {p:>9} {'trainer':>9} {k:>10} {real:8.1f}  with --workers "
                              f"{workers} on {args.trainer}: {real / ((before + ips) / 2):.2f}x the in-memory "
                              f"speed", flush=True)
                        print(f"{name:>6} {size:>4} {p:>9} {'in memory':>9} {k:>10} {ips:8.1f}", flush=True)
                        ratios.setdefault(workers, []).append(real / ((before + ips) / 2))
                    for workers, runs in ratios.items():
                        if len(runs) > 1:
                            print(f"{name:>6} {size:>4} {p:>9} the trainer with --workers {workers}: median "
                                  f"{statistics.median(runs):.2f}x the in-memory speed over {len(runs)} runs",
                                  flush=True)

if __name__ == "__main__":
    main()
