"""What a checkpoint's network predicts from held-out images noised to each time t: how near the
clean image, and at what contrast. Where training drew few times, the prediction drifts.

    python tests/benchmark_prediction.py --checkpoint experiments/celeba32/checkpoints/last.pt

For --images validation images x1 of the checkpoint's data (its --data_root and crop) and noise x0
of seed 0, at each t of --times it feeds x_t = t x1 + (1 - t) x0 to the EMA weights (asking a
conditional model for nothing) and prints
- the mean squared error of x_pred against x1;
- the contrast: the least-squares slope of x_pred on x1, each image's mean removed (1: the
  prediction keeps the image's contrast; above 1 it raises it);
- the share of the training times above t under the run's logit-normal (--t_mu, --t_sigma).
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. last.pt)")
    parser.add_argument("--images", type=celebgen.positive(int), default=256,
                        help="validation images (and noise) per time")
    parser.add_argument("--times", type=celebgen.number(float, above=0, below=1), nargs="+",
                        default=[0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999], help="the times t")
    args = parser.parse_args()
    celebgen.exit_on_user_error(report, args)


def report(args):
    """The table, for the parsed flags; a bad checkpoint or missing data raise UserError."""
    ckpt = celebgen.load_checkpoint(Path(args.checkpoint))
    trained = argparse.Namespace(**ckpt["args"])
    model = celebgen.load_model(ckpt, torch.device("cpu"))
    val = celebgen.make_dataset(trained, "val", cache=False)
    count = min(args.images, len(val))
    x1 = torch.stack([val[i] for i in range(count)])                         # (n, C, H, W)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
    print(f"checkpoint {args.checkpoint}, step {ckpt['step']}, EMA weights; {count} validation "
          f"images; training times logit-normal({trained.t_mu:g}, {trained.t_sigma:g})")
    print(f"{'t':>6} {'MSE':>8} {'contrast':>9} {'training times above t':>23}")
    centred = lambda x: x - x.mean(dim=(1, 2, 3), keepdim=True)
    for t in args.times:
        times = torch.full((count,), t)
        with torch.no_grad():
            x_pred = model(celebgen.interpolate(x1, x0, times), times).float()
        slope = (centred(x1) * centred(x_pred)).sum() / (centred(x1) ** 2).sum()
        z = (math.log(t / (1 - t)) - trained.t_mu) / trained.t_sigma
        above = 0.5 * math.erfc(z / math.sqrt(2))
        print(f"{t:>6g} {((x_pred - x1) ** 2).mean().item():>8.4f} {slope.item():>9.3f} "
              f"{above:>23.2e}", flush=True)


if __name__ == "__main__":
    main()
