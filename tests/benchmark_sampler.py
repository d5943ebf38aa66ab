"""Changes to sampling that celebgen does not make, scored by fid.py as it scores its own:

    python tests/benchmark_sampler.py --guidance_interval 0.15 0.8 --exp_name E --autoguidance 2
    python tests/benchmark_sampler.py --churn 0.1 --exp_name E
    python tests/benchmark_sampler.py --guide raw --exp_name E

--guidance_interval FROM TO: autoguidance only at times t in [FROM, TO), the model alone elsewhere
(the interval Kynkaanniemi et al. 2024 found best for classifier-free guidance).
--churn GAMMA: EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) with an Euler step in
place of its Heun step; GAMMA is its per-step gamma (S_churn / steps there, here uncapped). Before
each step from t in [0.02, 0.95), fresh noise raises the noise level sigma = (1 - t) / t to
sigma (1 + GAMMA): at t_hat = 1 / (1 + sigma (1 + GAMMA)) the path x = t x1 + (1 - t) x0 scaled by
t_hat / t has noise (t_hat / t)(1 - t), and noise of the rest, sqrt((1 - t_hat)^2 -
(t_hat (1 - t) / t)^2), is added; the Euler step then starts from t_hat. The fresh noise comes
from a generator of its own, seeded with --seed.
--guide raw: autoguidance by guide.pt's raw weights instead of its EMA; --guide own_raw: by the
sampled checkpoint's own raw weights (the EMA still sampled; guide.pt must exist all the same, as
fid.py checks it).
--guidance_interval and --guide need autoguidance (a model without --attributes, a guide.pt, and
--autoguidance other than 1). Every other flag is fid.py's (python fid.py --help). The result is
printed, never written (fid.json stays fid.py's own).
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen  # noqa: E402
import fid  # noqa: E402

CHURN_FROM, CHURN_TO = 0.02, 0.95  # EDM's S_tmin = 0.05 and S_tmax = 50, as sigma = (1 - t) / t


def autoguide_only_between(t_from, t_to):
    """Make celebgen's autoguidance guide only at times t in [t_from, t_to)."""
    forward = celebgen.Autoguided.forward

    def limited(self, x_t, t, attributes=None):
        if t_from <= t[0].item() < t_to:  # one time for the whole batch
            return forward(self, x_t, t, attributes)
        return self.model(x_t, t, attributes).float()

    celebgen.Autoguided.forward = limited


def guided_by(which):
    """Make celebgen's autoguidance guide by guide.pt's raw weights ("raw") or by the sampled
    checkpoint's own raw weights ("own_raw")."""
    def with_guide(model, ckpt, path, weight, device, use_ema=True):
        guide, weight = celebgen.find_guide(path, ckpt, weight)
        if guide is None:
            return model
        raw = celebgen.load_model(guide if which == "raw" else ckpt, device, use_ema=False)
        print(f"the guide: the raw weights of {'guide.pt' if which == 'raw' else path}")
        return celebgen.Autoguided(model, raw, weight)

    celebgen.with_guide = with_guide


def autoguidance_required():
    """Make celebgen's autoguidance stop the run when it would sample without a guide."""
    with_guide = celebgen.with_guide

    def required(*args, **kwargs):
        model = with_guide(*args, **kwargs)
        if not isinstance(model, celebgen.Autoguided):
            sys.exit("error: --guidance_interval and --guide change autoguidance, which this run "
                     "does not use: drop them, or pass an --autoguidance other than 1")
        return model

    celebgen.with_guide = required


def churned(gamma, generator):
    """celebgen.sample's Euler, each step from t in [CHURN_FROM, CHURN_TO) after fresh noise."""
    @torch.no_grad()
    def sample(model, noise, times, method="euler", attributes=None, cfg_scale=1.0):
        x = noise.float()
        for t, t_next in zip(times[:-1], times[1:]):
            if CHURN_FROM <= t < CHURN_TO:
                t_hat = 1 / (1 + (1 - t) / t * (1 + gamma))
                rest = math.sqrt((1 - t_hat) ** 2 - (t_hat * (1 - t) / t) ** 2)
                fresh = torch.randn(x.shape, generator=generator).to(x.device)
                x, t = t_hat / t * x + rest * fresh, t_hat
            t_batch = torch.full((x.shape[0],), t, device=x.device)
            x_pred = celebgen.guided_prediction(model, x, t_batch, attributes, cfg_scale)
            x = x + (t_next - t) * celebgen.velocity(x_pred, x, t_batch, t_eps=0.0)
        return x

    return sample


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidance_interval", type=float, nargs=2, metavar=("FROM", "TO"),
                        help="autoguide only at times t in [FROM, TO)")
    parser.add_argument("--churn", type=celebgen.positive(float), metavar="GAMMA",
                        help="EDM's churn: raise sigma = (1 - t) / t by 1 + GAMMA before each "
                             "step from t in [0.02, 0.95)")
    parser.add_argument("--guide", choices=["ema", "raw", "own_raw"], default="ema",
                        help="the guide: guide.pt's EMA (as celebgen), its raw weights, or the "
                             "sampled checkpoint's own raw weights")
    args, fid_argv = parser.parse_known_args()
    interval = args.guidance_interval
    if interval and not 0 <= interval[0] < interval[1] <= 1:
        parser.error("--guidance_interval FROM TO needs 0 <= FROM < TO <= 1")
    fid_args = celebgen.exit_on_user_error(fid.make_parser().parse_args, fid_argv)  # fid.py's
    if args.churn and fid_args.method != "euler":
        parser.error("--churn changes the Euler sampler: drop --method")
    if interval:
        autoguide_only_between(*interval)
    if args.guide != "ema":
        guided_by(args.guide)
    if interval or args.guide != "ema":
        autoguidance_required()
    if args.churn:
        celebgen.sample = churned(args.churn, torch.Generator().manual_seed(fid_args.seed))
    fid.write_result = lambda *_: None  # printed by fid.py; its fid.json is not this sampler's
    fid.main(fid_argv)
    times = f"[{interval[0]:g}, {interval[1]:g})" if interval else "[0, 1)"
    print(f"the FID above: guided by {args.guide} at t in {times}, churn {args.churn or 0:g}")


if __name__ == "__main__":
    main()
