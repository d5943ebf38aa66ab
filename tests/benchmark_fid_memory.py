"""Peak memory (RSS) of fid.py against the number of images: it should not grow with N.

    python tests/benchmark_fid_memory.py --inception_weights WEIGHTS --counts 2000 20000

WEIGHTS is pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: $FID_INCEPTION_WEIGHTS).

For each count N, writes N toy faces (64x64 PNGs) to a temporary folder, runs
`python fid.py FOLDER reference.npz` in a fresh process (the .npz side needs no images), and prints that
process's peak resident memory, its wall time and images/s. Images, features and their statistics
stream a batch at a time; KID keeps a sample of at most 10,000 features (8 KB each) in one array, of
which only the rows written take memory: 16 MB at 2,000 images, 82 MB from 10,000 on. So the peak may
differ by about 66 MB between 2,000 and 20,000 images, and no more; holding every image as float32
would add 48 KB per image (0.9 GB at 20k).
Slow on a CPU: Inception runs at a few images/s per core.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import celebgen  # noqa: E402
from benchmark_speed import cpu_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inception_weights", default=os.environ.get("FID_INCEPTION_WEIGHTS"),
                        required=not os.environ.get("FID_INCEPTION_WEIGHTS"),
                        help="pytorch-fid's weights file (default: $FID_INCEPTION_WEIGHTS)")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000], help="numbers of images")
    parser.add_argument("--image_size", type=int, default=64, help="side of the toy faces written")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.npz"
        np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))
        faces = celebgen.ToyFaces(args.image_size)
        for count in args.counts:
            folder = Path(tmp) / f"n{count}"
            folder.mkdir()
            for i in range(count):
                celebgen.save_png((faces[i] + 1) / 2, folder / f"{i:06d}.png")
            start = time.time()
            process = subprocess.Popen([sys.executable, str(ROOT / "fid.py"), str(folder), str(reference),
                                        "--inception_weights", args.inception_weights],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the maximum of all
            seconds = time.time() - start
            output = process.stdout.read().strip()
            if status != 0:
                sys.exit(f"fid.py failed on {count} images: {output}")
            print(f"{count:>6} images: peak RSS {usage.ru_maxrss / 1024:.0f} MB | {seconds:.0f} s | "
                  f"{count / seconds:.1f} img/s | {output}", flush=True)


if __name__ == "__main__":
    main()
