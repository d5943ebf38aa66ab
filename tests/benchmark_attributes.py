"""How often a toy-face model draws what it is asked for, scored by a classifier, at each guidance
weight.

    python tests/benchmark_attributes.py --checkpoint experiments/notebook/checkpoints/last.pt

Toy faces carry exact labels (they are drawn from them), so a small CNN trained on fresh toy faces
can score samples; its accuracy on held-out toy faces is printed first (samples are rougher than
the faces it learnt from, so on them it may err more). Then it samples --num_samples images (Euler,
--steps steps, the EMA weights) once at w = 0, which ignores any request, and for each request of
the notebook's attribute grid at each --cfg_scale, and prints the fraction the classifier finds
with each attribute, beside the fraction in the training data.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen  # noqa: E402

REQUESTS = ["Blond_Hair=1", "Blond_Hair=0", "Eyeglasses=1", "Wearing_Hat=1",
            "Smiling=1,Eyeglasses=0"]
NAMES = ["Blond_Hair", "Eyeglasses", "Smiling", "Wearing_Hat"]


def labels(size, count, offset):
    """(count, 4) labels in {0, 1} of the toy faces from index offset (no picture is drawn)."""
    toy = celebgen.ToyFaces(size, count, offset, NAMES)
    return (torch.stack([toy.label(i) for i in range(count)]) > 0).float()


def faces(size, count, offset):
    """(count, 3, size, size) toy faces from index offset, and their labels (count, 4)."""
    toy = celebgen.ToyFaces(size, count, offset)
    return torch.stack([toy[i] for i in range(count)]), labels(size, count, offset)


def classifier(size, count, epochs=3, batch_size=64):
    """A small CNN with four logits, trained on `count` toy faces disjoint from the generator's
    training, validation and test faces."""
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, len(NAMES)))
    images, labels = faces(size, count, offset=5 * 10**6)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(count, generator=generator).split(batch_size):
            x = images[batch]
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5,
                            x, x.flip(3))                   # the model's training flips too
            x = x + 0.03 * torch.randn(x.shape, generator=generator)   # samples are not exact
            loss = nn.functional.binary_cross_entropy_with_logits(net(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def rates(net, images):
    """(4,) fraction of images (B, 3, H, W) the classifier finds with each attribute."""
    with torch.no_grad():
        return (net(images) > 0).float().mean(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = parser.add_argument
    arg("--checkpoint", required=True, help="a toy-face checkpoint trained with --attributes all")
    arg("--num_samples", type=celebgen.positive(int), default=100,
        help="samples per request and weight")
    arg("--steps", type=celebgen.positive(int), default=30,
        help="Euler steps (the notebook's grid: 30)")
    arg("--time_power", type=celebgen.number(float, above=0, below=5),
        help=celebgen.TIME_POWER_HELP)
    arg("--cfg_scale", type=celebgen.number(float, above=0), nargs="+", default=[1.0, 3.0],
        help="guidance weights besides 0 (w = 0, the unconditional model, is always scored)")
    arg("--train_faces", type=celebgen.positive(int), default=10_000, help="the classifier's data")
    args = parser.parse_args()
    torch.manual_seed(0)
    ckpt = celebgen.exit_on_user_error(celebgen.load_checkpoint, args.checkpoint)
    trained, size = ckpt["args"]["attributes"], ckpt["args"]["image_size"]
    if sorted(trained) != sorted(NAMES) or ckpt["args"]["dataset"] != "toy":
        sys.exit("error: --checkpoint must be a toy-face model trained with --attributes all")
    model = celebgen.load_model(ckpt, torch.device("cpu"))

    start = time.time()
    net = classifier(size, args.train_faces)
    held_out, held_out_labels = faces(size, 2000, offset=10**6)
    with torch.no_grad():
        accuracy = ((net(held_out) > 0).float() == held_out_labels).float().mean(0)
    print(f"classifier: {args.train_faces} toy faces, {time.time() - start:.0f} s; accuracy on "
          f"2000 held-out faces: " + ", ".join(f"{n} {a:.3f}" for n, a in zip(NAMES, accuracy)))
    print(f"checkpoint {args.checkpoint}, step {ckpt['step']}; Euler {args.steps} steps "
          f"(time power {args.time_power or 'default'}), "
          f"{args.num_samples} samples per cell; fraction with each attribute")

    def report(label, w, fractions):
        print(f"{label:<24}{w:>5}" + "".join(f"{f:>13.2f}" for f in fractions), flush=True)

    def scored(row, w):  # row (K,) in the checkpoint's attribute order
        asked = row.expand(len(noise), -1)                                   # (n, K)
        times = celebgen.time_grid(args.steps, args.time_power)
        return rates(net, celebgen.sample(model, noise, times, "euler", asked, w).clamp(-1, 1))

    print(f"{'request':<24}{'w':>5}" + "".join(f"{n:>13}" for n in NAMES))
    report("training data", "", labels(size, 5000, offset=0).mean(0))
    noise = torch.randn(args.num_samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    report("any (w = 0 ignores it)", 0, scored(torch.zeros(len(trained)), 0.0))
    for request in REQUESTS:
        row = celebgen.attribute_rows([celebgen.attribute_setting(request)], [1.0], trained)[0]
        for w in args.cfg_scale:
            report(request, f"{w:g}", scored(row, w))

if __name__ == "__main__":
    main()
