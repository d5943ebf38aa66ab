"""What classifier-free guidance costs in FID and buys in attribute fidelity, for a CelebA model
trained with --attributes.

    python tests/benchmark_guidance.py --exp_name cond20 --cfg_scale 0 1 1.5 2 3

A linear probe on the FID Inception's pool features learns each attribute from the labelled
training images; its accuracy is printed first, each fifth of them scored by the probe fitted on
the rest (the same person may be on both sides). Then for each weight it samples --num_samples
images asked for the labels fid.py asks for (those of the references, else of the training
images), and prints their FID and KID against the held-out images, as fid.py computes them, beside
the fraction of the samples in which the probe finds what was asked, per attribute. Needs the
Inception weights (fid.py's --inception_weights or $FID_INCEPTION_WEIGHTS).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen  # noqa: E402
import fid  # noqa: E402


def features(inception, images, batch_size=50):
    """(N, 2048) pool features of images (N, 3, H, W) in [-1, 1], rounded to 8 bits as in fid.py."""
    return torch.cat([inception(fid.quantized(batch))[0] for batch in images.split(batch_size)])


def labelled_images(train_args):
    """(N, 3, H, W) training images that have attribute labels, and their labels (N, K) of -1/+1."""
    data = celebgen.make_dataset(train_args, "train", cache=False)
    index = [i for i in range(len(data)) if data.label(i).all()]
    if len(index) < 20:
        sys.exit(f"error: {len(index)} training images have labels; the probe needs 20 or more")
    return torch.stack([data[i] for i in index]), torch.stack([data.label(i) for i in index])


def probe(x, y, steps=300, weight_decay=0.1):
    """A linear classifier per attribute on features x (N, D), labels y (N, K) of -1/+1: logistic
    regression on standardised features, L2-penalised, fitted by L-BFGS. Returns f(x) -> logits."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        logits = z @ w + b
        value = torch.nn.functional.softplus(-y * logits).mean() + weight_decay * (w ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return lambda f: ((f - mean) / std) @ w.detach() + b.detach()


def agreement(logits, asked):
    """(K,) fraction of the samples, among those asked for attribute k, in which the probe finds the
    asked value (logit > 0 for +1, < 0 for -1)."""
    hit = (torch.sign(logits) == asked).float()
    return (hit * (asked != 0)).sum(0) / (asked != 0).sum(0).clamp(min=1)


def guide_only_between(t_from, t_to):
    """Make celebgen's sampler guide only at times t in [t_from, t_to), with weight 1 elsewhere
    (a guidance interval, Kynkaanniemi et al. 2024)."""
    guided_prediction = celebgen.guided_prediction

    def limited(model, x_t, t, attributes, cfg_scale):
        inside = t_from <= t[0].item() < t_to  # one time for the whole batch
        return guided_prediction(model, x_t, t, attributes, cfg_scale if inside else 1.0)

    celebgen.guided_prediction = limited  # sample() looks it up at each step


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = parser.add_argument
    arg("--exp_name", required=True, type=celebgen.experiment_name,
        help="a CelebA experiment trained with --attributes")
    arg("--checkpoint", default="last.pt", help="a name in its checkpoints/ or a path")
    arg("--cfg_scale", type=celebgen.number(float, at_least=0), nargs="+",
        default=[0.0, 1.0, 1.5, 2.0, 3.0], help="guidance weights to score")
    arg("--num_samples", type=celebgen.number(int, at_least=2), default=1000,
        help="samples per weight")
    arg("--ref_images", type=celebgen.number(int, at_least=2), default=1440,
        help="held-out images FID compares with")
    arg("--num_sampling_steps", type=celebgen.positive(int), default=20, help="sampling steps")
    arg("--method", choices=celebgen.METHODS, default="euler", help=celebgen.METHOD_HELP)
    arg("--seed", type=celebgen.SEED, default=0, help="seed of the noise")
    arg("--autoguidance", type=celebgen.number(float, at_least=0),
        help=celebgen.AUTOGUIDANCE_HELP)
    arg("--guidance_interval", type=float, nargs=2, metavar=("FROM", "TO"),
        help="guide only at times t in [FROM, TO) (weight 1 elsewhere)")
    arg("--inception_weights", help="pytorch-fid's weights file (or set $FID_INCEPTION_WEIGHTS)")
    args = parser.parse_args()
    interval = args.guidance_interval
    if interval and not 0 <= interval[0] < interval[1] <= 1:
        parser.error("--guidance_interval FROM TO needs 0 <= FROM < TO <= 1")
    fid_args = fid.make_parser().parse_args([
        "--exp_name", args.exp_name, "--checkpoint", args.checkpoint,
        "--num_samples", str(args.num_samples), "--ref_images", str(args.ref_images),
        "--num_sampling_steps", str(args.num_sampling_steps), "--method", args.method,
        "--seed", str(args.seed)])
    fid.choose_protocol(fid_args)
    if interval:
        guide_only_between(*interval)
    device, precision = torch.device("cpu"), "fp32"
    path = celebgen.checkpoint_path(args.exp_name, args.checkpoint)
    ckpt = celebgen.exit_on_user_error(celebgen.load_checkpoint, path)
    train_args = argparse.Namespace(**ckpt["args"])
    if train_args.dataset != "celeba" or not train_args.attributes:
        sys.exit("error: --exp_name must be a CelebA model trained with --attributes")
    model = celebgen.exit_on_user_error(celebgen.with_guide, celebgen.load_model(ckpt, device),
                                        ckpt, path, args.autoguidance, device)
    names = train_args.attributes
    asked, source = celebgen.exit_on_user_error(fid.sample_attributes, train_args, fid_args)
    inception = celebgen.exit_on_user_error(fid.inception, args.inception_weights, device)
    ref = fid.reference_statistics(train_args, inception, fid_args, device)

    start = time.time()
    images, labels = labelled_images(train_args)
    x = features(inception, images)
    folds = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).chunk(5)
    logits = torch.empty_like(labels)  # each image scored by the probe fitted without its fifth
    for k, held in enumerate(folds):
        fit = torch.cat(folds[:k] + folds[k + 1:])
        logits[held] = probe(x[fit], labels[fit])(x[held])
    accuracy = agreement(logits, labels)
    classify = probe(x, labels)  # fitted on all of them to score the samples
    print(f"probe: {len(x)} labelled training images, {time.time() - start:.0f} s; accuracy, each "
          f"fifth scored by the probe fitted on the rest: "
          + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, accuracy)))
    print(f"checkpoint step {ckpt['step']}; {args.num_samples} samples per weight, {args.method} "
          f"{args.num_sampling_steps} steps (default times), autoguidance "
          f"{model.weight if isinstance(model, celebgen.Autoguided) else 1:g}, guided at t in "
          f"{args.guidance_interval or 'all'}, asked for the {source}; FID and KID "
          f"against {ref['count']} held-out images; agreement: the probe finds what was asked")
    print("share with each attribute among the labelled images: " + ", ".join(
        f"{n} {r:.2f}" for n, r in zip(names, (labels == 1).float().mean(0))))
    print(f"{'w':>5}{'FID':>8}{'KID':>9}" + "".join(f"{n:>14}" for n in names))
    for w in args.cfg_scale:
        samples = torch.cat(list(celebgen.generate(model, fid_args, device, precision,
                                                   attributes=asked, cfg_scale=w)))
        f = features(inception, samples)
        fx = f.numpy().astype(np.float64)
        score = fid.frechet_distance(fx.mean(0), np.cov(fx, rowvar=False), ref["mu"], ref["sigma"])
        kid, _ = fid.kernel_inception_distance(f.numpy(), ref["features"])  # as fid.py
        print(f"{w:>5g}{score:>8.1f}{kid:>9.4f}" + "".join(
            f"{a:>14.3f}" for a in agreement(classify(f), asked)), flush=True)


if __name__ == "__main__":
    main()
