"""fid.py against pytorch-fid on real CelebA images with the real FID Inception weights, in one run.

    python tests/benchmark_fid.py --data_root CELEBA_ROOT --inception_weights WEIGHTS

CELEBA_ROOT is a folder of CelebA in one of README's layouts (default: $CELEBGEN_CELEBA), WEIGHTS
pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: $FID_INCEPTION_WEIGHTS).

Splits CelebA's val+test images (64x64, the standard crop) into two disjoint halves (even and odd
positions), writes them as PNGs, and prints the FID between the halves from fid.py and from pytorch-fid
(the same PNG files, the same weights), their features' largest difference, and each one's
feature-extraction speed in images/s.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import celebgen  # noqa: E402
import fid  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=os.environ.get("CELEBGEN_CELEBA"),
                        required=not os.environ.get("CELEBGEN_CELEBA"),
                        help="CelebA in one of README's layouts (default: $CELEBGEN_CELEBA)")
    parser.add_argument("--inception_weights", default=os.environ.get("FID_INCEPTION_WEIGHTS"),
                        required=not os.environ.get("FID_INCEPTION_WEIGHTS"),
                        help="pytorch-fid's weights file (default: $FID_INCEPTION_WEIGHTS)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=50)
    args = parser.parse_args()
    import pytorch_fid.inception
    from pytorch_fid import fid_score

    images = [x for split in ("val", "test") for x in celebgen.CelebA(args.data_root, split, args.image_size)]
    state = torch.load(args.inception_weights, weights_only=True)
    ours = fid.FIDFeatures(state)
    pytorch_fid.inception.load_state_dict_from_url = lambda *a, **k: state
    theirs = pytorch_fid.inception.InceptionV3([3]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        halves = [Path(tmp) / "a", Path(tmp) / "b"]
        for k, folder in enumerate(halves):
            folder.mkdir()
            for i, image in enumerate(images[k::2]):
                celebgen.save_png(celebgen.to_unit(image), folder / f"{i:05d}.png")
        stats, speed, features = {}, {}, {}
        for name in ("fid.py", "pytorch-fid"):
            stats[name], features[name], start, count = [], [], time.time(), 0
            for folder in halves:
                if name == "fid.py":  # features kept here only to compare them; fid.py streams
                    running, f = fid.RunningStatistics(), []
                    for batch in fid.folder_batches(fid.folder_files(folder), args.batch_size):
                        f.append(ours(batch)[0].numpy())
                        running.add(f[-1])
                    f = np.concatenate(f)
                    stats[name].append(running.mean_and_covariance())
                else:
                    files = sorted(str(p) for p in folder.glob("*.png"))
                    f = fid_score.get_activations(files, theirs, args.batch_size, 2048, "cpu", num_workers=0)
                    stats[name].append((f.mean(axis=0), np.cov(f, rowvar=False)))
                features[name].append(f)
                count += len(f)
            speed[name] = count / (time.time() - start)
    print(f"{len(images)} val+test images at {args.image_size}x{args.image_size}, halves of "
          f"{len(images[0::2])} and {len(images[1::2])}")
    gap = max(np.abs(a - b).max() for a, b in zip(features["fid.py"], features["pytorch-fid"]))
    print(f"largest |feature difference|: {gap:.2e}")
    with np.errstate(all="ignore"):
        values = {"fid.py": fid.frechet_distance(*stats["fid.py"][0], *stats["fid.py"][1]),
                  "pytorch-fid": fid_score.calculate_frechet_distance(*stats["pytorch-fid"][0],
                                                                      *stats["pytorch-fid"][1])}
    for name in values:
        print(f"{name:>12}: FID {values[name]:.6f} | features {speed[name]:.1f} img/s")
    print(f"relative difference: {abs(values['fid.py'] - values['pytorch-fid']) / values['pytorch-fid']:.2e}")


if __name__ == "__main__":
    main()
