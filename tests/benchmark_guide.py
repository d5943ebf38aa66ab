"""Autoguidance by a smaller model, trained apart, scored as fid.py scores a run:

    python tests/benchmark_guide.py train --exp_name mini --data_root ./data/celeba_subset \\
        --compile --model mini --max_steps 2400 --cooldown 0
    python tests/benchmark_guide.py fid --guide experiments/mini/checkpoints/last.pt \\
        --exp_name E --checkpoint last.pt --num_samples 1000 --ref_images 1440

Karras et al. (2024) guide a model by a version of itself that is both smaller and trained less;
celebgen's guide.pt is the model itself, earlier. `train` is celebgen's `train` with one more
--model, mini (width 128, depth 3, 2 heads of width 64: 1.0M parameters against tiny's 4.2M).
`fid` is fid.py with the EMA of --guide's checkpoint (any model of the run's image and patch
size) in place of the run's guide.pt, at fid.py's --autoguidance weight (1.5 unless given); the
run needs a guide.pt all the same, as fid.py checks it. The result is printed, never written.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen  # noqa: E402
import fid  # noqa: E402

celebgen.MODELS["mini"] = dict(dim=128, depth=3, heads=2)


def guided_by(guide_path):
    """Make celebgen's autoguidance guide by the EMA of the checkpoint at guide_path."""
    with_guide = celebgen.with_guide

    def by_the_given_guide(model, ckpt, path, weight, device, use_ema=True):
        guided = with_guide(model, ckpt, path, weight, device, use_ema)
        if not isinstance(guided, celebgen.Autoguided):
            sys.exit("error: this run samples without autoguidance: pass an --autoguidance "
                     "other than 1, for a model trained without --attributes")
        guide = celebgen.load_checkpoint(guide_path)
        print(f"the guide: {guide_path} (model {guide['args']['model']}, step {guide['step']})")
        guided.guide = celebgen.load_model(guide, device)
        return guided

    celebgen.with_guide = by_the_given_guide


def main():
    if sys.argv[1:2] == ["train"]:
        return celebgen.main(sys.argv[1:])
    if sys.argv[1:3] != ["fid", "--guide"] or len(sys.argv) < 4:
        sys.exit(__doc__)
    guided_by(sys.argv[3])
    fid.write_result = lambda *_: None  # printed by fid.py; its fid.json is not this guide's
    fid.main(sys.argv[4:])


if __name__ == "__main__":
    main()
