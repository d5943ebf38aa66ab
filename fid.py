"""
fid.py: the Frechet Inception Distance (FID) of CelebGen samples, the same number as pytorch-fid's,
with the Kernel Inception Distance (KID) beside it, and the Inception Score (IS) in an experiment's
fid.json when the weights have a classifier.

FID compares two sets of images through the 2048-d "pool3" features of an Inception-v3 network: fit
a Gaussian (mean mu, covariance Sigma) to each set's features, then
    FID = ||mu1 - mu2||^2 + Tr(Sigma1 + Sigma2 - 2 (Sigma1 Sigma2)^(1/2)).
The network is the TensorFlow Inception of published FIDs, rebuilt from torchvision's Inception-v3
as pytorch-fid does, with pytorch-fid's weights. Images stream through it a batch at a time.

Commands:
    # 10k samples of an experiment's EMA weights (autoguided by its guide.pt) against the first 10k
    # held-out CelebA images (val, then test)
    python fid.py --exp_name celeba64 [--checkpoint best.pt]
    # the protocol of published CelebA-64 FIDs: 50k samples against the 162,770 training images
    python fid.py --exp_name celeba64 --protocol published
    # a model trained with --attributes is asked for the reference images' own labels, at
    # guidance weight 2 unless --cfg_scale says otherwise
    python fid.py --exp_name celeba64_attr --cfg_scale 1
    # compare two folders of images, or saved statistics (.npz with mu and sigma), like pytorch-fid
    python fid.py PATH_A PATH_B
"""
import argparse
import hashlib
import itertools
import json
import os
import signal
import sys
import time
import warnings
import zipfile
from pathlib import Path

if __name__ == "__main__":  # until main(): Ctrl-C while torch loads (seconds) ends it, quietly
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

import celebgen
from celebgen import UserError

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"


# --------------------------------------------------------------------------------------------------
#                                   1. The FID Inception-v3 and its weights
# --------------------------------------------------------------------------------------------------
# torchvision's Inception-v3 has the right layers, but three details of the TF graph differ, and
# each one shifts FID:
#   * TF's average pools ignore the zero padding at the border: each output is the mean of the
#     *valid* pixels of its 3x3 window. PyTorch's default divides by 9 there too (an edge output is
#     6/9 of that mean, a corner 4/9), so the A, C and first E blocks need count_include_pad=False.
#   * The last block (Mixed_7c) pools with a 3x3 *max* pool in TF, not an average pool.
#   * The TF classifier has 1008 outputs (1000 ImageNet classes plus 8 unused): num_classes=1008.
# Everything else (the convolutions, batch norms with eps 0.001) matches layer by layer, so the
# weights load with the same names.

def average_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(average_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, pool], 1)


class FIDInceptionC(InceptionC):
    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        pool = self.branch_pool(average_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, pool], 1)


class FIDInceptionE(InceptionE):
    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool  # average_pool in Mixed_7b, a 3x3 max pool in Mixed_7c

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl),
                                  self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pool = self.branch_pool(self.pool(x))
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, pool], 1)


def fid_inception():
    """The untrained FID Inception-v3, named as torchvision's (and so as pytorch-fid's) weights."""
    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False,
                                          init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (FIDInceptionA(c, pool_features=p) for c, p in
                                                ((192, 32), (256, 64), (288, 64)))
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (FIDInceptionC(768, channels_7x7=c)
                                                              for c in (128, 160, 160, 192))
    net.Mixed_7b = FIDInceptionE(1280, pool=average_pool)
    net.Mixed_7c = FIDInceptionE(2048, pool=lambda x: F.max_pool2d(x, 3, stride=1, padding=1))
    return net


class FIDFeatures(torch.nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> (pool3 features (B, 2048), logits (B, 1008)), preprocessed
    exactly as pytorch-fid: bilinear resize to 299x299 (align_corners=False, no antialiasing), then
    scaled to [-1, 1]. The logits leave out the classifier's bias, as the Inception Score's original
    code and torchmetrics' ("logits_unbiased") do."""

    def __init__(self, state_dict):
        super().__init__()
        self.net = fid_inception()
        self.net.load_state_dict(state_dict)
        self.classifier, self.net.fc = self.net.fc, torch.nn.Identity()  # net now ends at pool3
        self.eval()
        self.to(memory_format=torch.channels_last)  # faster convolutions on the CPU (measured)
        digest = hashlib.sha1()  # names the weights in the cache key of reference statistics
        for name, tensor in sorted(state_dict.items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.fingerprint = digest.hexdigest()[:10]

    @torch.no_grad()
    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = x.contiguous(memory_format=torch.channels_last)            # (B, 3, 299, 299)
        features = self.net(2 * x - 1)                                 # (B, 2048)
        return features, features @ self.classifier.weight.T           # (B, 1008)


def weights_file(path=None):
    """Where load_weights(path) reads the weights from: PATH, $FID_INCEPTION_WEIGHTS, or torch.hub's
    cache (hub/checkpoints/ under $TORCH_HOME, by default ~/.cache/torch)."""
    path = path or os.environ.get(WEIGHTS_ENV)
    return Path(path) if path else Path(torch.hub.get_dir(), "checkpoints", Path(WEIGHTS_URL).name)


def load_weights(path=None):
    """pytorch-fid's state dict from weights_file(path), downloaded there once if it is the cache's
    (no fallback to other weights), checked to be the FID Inception's: every name and shape, and
    every number finite."""
    given, file = path or os.environ.get(WEIGHTS_ENV), weights_file(path)
    if given and file.is_dir():
        raise UserError(f"Inception weights {given} is a folder; pass the weights file, "
                        f"{Path(WEIGHTS_URL).name} ({WEIGHTS_URL})")
    if given and not file.is_file():
        raise UserError(f"Inception weights {given} do not exist; download {WEIGHTS_URL} there")
    if not file.is_file():
        try:
            celebgen.writable_folder(file.parent)  # where the download goes
        except UserError as e:
            raise UserError(f"{e}; or pass --inception_weights PATH") from None
        try:  # to a temporary file, renamed when complete: a cut download leaves no file
            torch.hub.download_url_to_file(WEIGHTS_URL, str(file), progress=True)
        except Exception as e:  # no network, a proxy, a full disk: named by its type
            raise UserError(f"cannot download the FID Inception weights ({type(e).__name__}); "
                            f"download {WEIGHTS_URL} to {file}, or pass --inception_weights PATH, "
                            f"or set {WEIGHTS_ENV}") from None
    error = ""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, not a PyTorch file at all
        state, error = None, f" ({type(e).__name__})"
    with torch.device("meta"):  # the names and shapes the network expects, without memory
        expected = {name: t.shape for name, t in fid_inception().state_dict().items()}
    fix = (f"pass pytorch-fid's file ({WEIGHTS_URL}) instead" if given else
           "delete it, and the next run downloads it again")
    if not (isinstance(state, dict) and expected == {name: getattr(t, "shape", None)
                                                     for name, t in state.items()}):
        what = f"is unreadable{error}" if error else "holds other weights"
        raise UserError(f"{file} {what}, not the FID Inception weights; {fix}")
    if not all(t.isfinite().all() for t in state.values()):  # else features NaN or inf
        raise UserError(f"{file} holds numbers that are not finite (NaN or inf): it is damaged; "
                        f"{fix}")
    return state


def inception(path, device):
    """The FID network with the weights of load_weights(path), and that file and its SHA-256 (which
    fid.json records) as .weights_file and .weights_sha256."""
    model = FIDFeatures(load_weights(path)).to(device)
    model.weights_file, model.weights_sha256 = weights_file(path), None
    if model.weights_file.is_file():
        digest = hashlib.sha256()
        with open(model.weights_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        model.weights_sha256 = digest.hexdigest()
    return model


# --------------------------------------------------------------------------------------------------
#                                   2. The scores: FID, KID and the Inception Score
# --------------------------------------------------------------------------------------------------

class RunningStatistics:
    """Mean and covariance of features that arrive a batch at a time, in float64. Batches merge by
    the update of Chan, Golub and LeVeque, where M2 is the sum of outer products of deviations:
        n = n_a + n_b,   delta = mean_b - mean_a,   mean = mean_a + delta n_b / n,
        M2 = M2_a + M2_b + delta delta^T n_a n_b / n,   covariance = M2 / (n - 1).
    This equals np.cov of all features at once (tested), without keeping them, and without the
    cancellation of the one-pass sum(x x^T) - n mean mean^T."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, features):                                   # (B, D)
        features = features.astype(np.float64)
        n_b, mean_b = len(features), features.mean(axis=0)
        deviations = features - mean_b                           # (B, D)
        n = self.count + n_b
        delta = mean_b - self.mean                               # (D,)
        m2_b = deviations.T @ deviations                         # (D, D)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * self.count * n_b / n
        self.mean = self.mean + delta * n_b / n
        self.count = n

    def mean_and_covariance(self):
        """Mean (D,) and covariance (D, D), np.cov's unbiased N-1 estimate."""
        if self.count < 2:  # np.cov of one sample is all NaN, and sqrtm of NaNs may never return
            raise UserError(f"FID needs at least 2 images per side, got {self.count}")
        if self.count <= len(self.mean):  # rank at most count - 1, below the dimension
            print(f"warning: FID from {self.count} images, no more than the {len(self.mean)} "
                  f"features: the covariance is singular and FID is strongly biased upwards; "
                  f"use at least 10000 images for numbers to compare", file=sys.stderr)
        return self.mean, self.m2 / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(Sigma1) + Tr(Sigma2) - 2 Tr((Sigma1 Sigma2)^(1/2)), as pytorch-fid
    computes it. Sigma1 Sigma2 is not symmetric, so its root comes from scipy's general sqrtm; if
    that is not finite (singular covariances from few images), eps is added to both diagonals and
    it is taken again. Rounding leaves a tiny imaginary part, which must be negligible: dropped,
    and can take the distance of equal statistics a hair below 0, which a distance is not: 0."""
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("FID of statistics that are not finite")  # sqrtm may never return
    with warnings.catch_warnings():  # "singular matrix": small N has been warned about
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        print(f"FID: the product of the covariances is singular; adding {eps:g} to their diagonals "
              f"(as pytorch-fid does)", file=sys.stderr)
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.abs(covmean.imag).max():g}")
        covmean = covmean.real
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return max(0.0, float(distance))

# KID, the kernel inception distance (Binkowski et al., "Demystifying MMD GANs"), is the squared
# maximum mean discrepancy between two sets of D-d features under the cubic kernel
# k(a, b) = (a.b / D + 1)^3. Unlike FID's, its estimator is unbiased, so runs of 1,000 images
# compare with bigger ones. On m features x_i and m features y_j,
#     MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
#               - 2 sum_{i, j} k(x_i, y_j) / m^2,
# averaged over KID_SUBSETS random subsets of m = min(KID_SUBSET_SIZE, N_x, N_y) per side, with its
# standard deviation over them (about 0 when neither side has more than m features: then every
# subset holds them all). Each side keeps a uniform sample of at most KID_FEATURES features.
KID_FEATURES, KID_SUBSETS, KID_SUBSET_SIZE = 10_000, 100, 1000  # kept features: 82 MB a side


class FeatureSample:
    """A uniform random sample of at most `capacity` of the feature vectors that pass, a batch at a
    time, by reservoir sampling: the first `capacity` vectors are kept; after them, the i-th (from
    0) replaces a random kept one with probability capacity / (i + 1). Seeded, so the same images
    keep the same sample."""

    def __init__(self, capacity=KID_FEATURES, seed=0):
        self.capacity, self.rng = capacity, np.random.default_rng(seed)
        self.kept, self.seen = None, 0  # kept: one (capacity, D) array, made at the first batch

    def add(self, features):                                   # (B, D)
        if self.kept is None:
            self.kept = np.empty((self.capacity, features.shape[1]), np.float32)  # (capacity, D)
        for vector in features:
            if self.seen < self.capacity:
                self.kept[self.seen] = vector
            elif (j := self.rng.integers(self.seen + 1)) < self.capacity:
                self.kept[j] = vector
            self.seen += 1

    def features(self):                                        # (min(seen, capacity), D)
        return self.kept[:min(self.seen, self.capacity)]


def kernel_inception_distance(x, y, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """(mean, standard deviation) of MMD^2_u over `subsets` random subsets of features x (N_x, D)
    and y (N_y, D), in float64."""
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise UserError(f"KID needs at least 2 images per side, got {min(len(x), len(y))}")
    rng, d, estimates = np.random.default_rng(seed), x.shape[1], []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)].astype(np.float64)    # (m, D)
        b = y[rng.choice(len(y), m, replace=False)].astype(np.float64)    # (m, D)
        k_aa, k_bb, k_ab = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))  # (m, m)
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        estimates.append(within - 2 * k_ab.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


class InceptionScore:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y|x) the softmax of an image's logits and p(y) its mean
    over the images, in each of `splits` consecutive chunks of `total` images, then averaged. In a
    chunk, with p = p(y|x) and pbar = p(y) = mean_x p,
        E_x KL = mean_x sum_y p log p  -  sum_y pbar log pbar,
    so two running sums per chunk suffice and the softmaxes need not be kept."""

    def __init__(self, total, splits=10):
        chunks = np.array_split(np.arange(total), min(splits, total))
        self.ends = np.cumsum([len(c) for c in chunks])   # where each chunk ends
        self.sum_p, self.sum_plogp, self.seen = 0.0, np.zeros(len(self.ends)), 0

    def add(self, logits):                                     # (B, 1008)
        p = logits.double().softmax(dim=1).numpy()
        chunk = np.searchsorted(self.ends, self.seen + np.arange(len(p)), side="right")  # (B,)
        sum_p = np.zeros((len(self.ends), p.shape[1]))
        np.add.at(sum_p, chunk, p)
        self.sum_p = self.sum_p + sum_p
        np.add.at(self.sum_plogp, chunk, np.sum(p * np.log(p + 1e-12), axis=1))
        self.seen += len(p)

    def score(self):
        counts = np.diff(self.ends, prepend=0)[:, None]
        pbar = self.sum_p / counts
        kl = self.sum_plogp / counts[:, 0] - np.sum(pbar * np.log(pbar + 1e-12), axis=1)
        return float(np.mean(np.exp(kl)))


# --------------------------------------------------------------------------------------------------
#                                   3. Images in, statistics out
# --------------------------------------------------------------------------------------------------

def feature_statistics(model, batches, total, device, score=None):
    """(mu, sigma, features: a FeatureSample's, for KID) of the network's features of (B, 3, H, W)
    batches in [0, 1]; their logits go to `score`, an InceptionScore, if given. Memory does not
    grow with N. Progress goes to stderr in whole lines, which interleave cleanly with a sampler's:
    after a batch that ends 10 s or more after the previous line, and after the last batch."""
    stats, sample, done, start = RunningStatistics(), FeatureSample(), 0, time.monotonic()
    reported = start
    for batch in batches:
        features, logits = model(batch.to(device))
        if not features.isfinite().all():  # finite images in, so the weights are damaged
            raise UserError(f"the Inception network gave features that are not finite (NaN or "
                            f"inf): its weights {getattr(model, 'weights_file', '')} are damaged; "
                            f"fetch them again ({WEIGHTS_URL})")
        stats.add(features.cpu().numpy())
        sample.add(features.cpu().numpy())
        if score is not None:
            score.add(logits.cpu())
        done += len(batch)
        now = time.monotonic()
        if now - reported >= 10 or done == total:
            print(f"Inception features: {done}/{total} images | {done / (now - start):.1f} img/s",
                  file=sys.stderr, flush=True)
            reported = now
    return (*stats.mean_and_covariance(), sample.features())


def batched(images, batch_size):
    """An iterable of (3, H, W) tensors -> batches (B, 3, H, W), reading one batch at a time."""
    images = iter(images)
    while batch := list(itertools.islice(images, batch_size)):
        yield torch.stack(batch)


def open_image(path, read):
    """read(the opened PIL image), or a UserError naming the file."""
    try:
        with Image.open(path) as img:
            return read(img)
    except celebgen.UNREADABLE as e:  # PIL's errors for truncated, corrupt or huge files
        raise UserError(f"cannot read image {path} ({e}); remove or replace it") from None


def folder_files(folder):
    """The image files of a folder that pytorch-fid reads, checked before any Inception work: each
    decodes whole (a file cut short after its header included), all of one size."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder} {celebgen.not_found(folder)}; give two folders of images or two "
                        f".npz files")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder of images or an .npz of statistics")
    # pytorch-fid's rule, which FID of a folder must follow to give the same number: its extensions
    # (celebgen's list), in lower case only (a.PNG is not read), in sorted order
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix[1:] in celebgen.IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise UserError(f"{folder} holds {len(files)} images with a lower-case extension "
                        f"({', '.join(celebgen.IMAGE_EXTENSIONS)}); FID needs at least 2")
    sizes = {}
    for f in files:
        sizes.setdefault(open_image(f, decoded_size), f)
        if len(sizes) > 1:
            (a, first), (b, other) = sizes.items()
            raise UserError(f"{other} is {b[0]}x{b[1]} but {first.name} is {a[0]}x{a[1]}; FID of "
                            f"a folder needs images of one size")
    return files


def decoded_size(img):
    img.load()  # every pixel: a header can be whole where the data is cut short
    return img.size


def folder_batches(files, batch_size):
    """Images as pytorch-fid reads them (PIL, RGB, [0, 1]), a batch (B, 3, H, W) at a time."""
    return batched((open_image(f, celebgen.image_tensor).float() / 255 for f in files), batch_size)


def npz_statistics(path):
    """(mu, sigma, features or None) saved by pytorch-fid (--save-stats: no features) or fid.py."""
    if Path(path).is_dir():
        raise UserError(f"{path} is a folder, and a name ending in .npz is read as statistics; "
                        f"rename a folder of images")
    if not Path(path).is_file():
        raise UserError(f"{path} {celebgen.not_found(path)}; give two folders of images or two "
                        f".npz files")
    try:
        stats = np.load(path)
        if not isinstance(stats, np.lib.npyio.NpzFile):  # an .npy: one array, none named mu
            raise ValueError("one array")
        with stats:
            mu, sigma = stats["mu"], stats["sigma"]
            features = stats["features"] if "features" in stats else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # cut short, or not
        raise UserError(f"{path} is not an .npz of FID statistics with arrays mu and sigma "
                        f"({type(e).__name__}); compute it again (a cached reference: delete it, "
                        f"and fid.py remakes it)") from None
    arrays = [mu, sigma] + ([] if features is None else [features])
    if (mu.ndim != 1 or len(mu) == 0 or sigma.shape != (len(mu), len(mu))
            or (np.diagonal(sigma) < 0).any()
            or (features is not None and (features.ndim != 2 or features.shape[1] != len(mu)))
            or not all(np.issubdtype(a.dtype, np.floating) for a in arrays)):
        raise UserError(f"{path}: mu {mu.shape} {mu.dtype}, sigma {sigma.shape} {sigma.dtype} and "
                        f"features {None if features is None else features.shape} are not a mean, "
                        f"its covariance and the features; compute it again (a cached reference: "
                        f"delete it, and fid.py remakes it)")
    if features is not None and len(features) < 2:  # fid.py saves those of 2 images or more
        raise UserError(f"{path} holds features of {len(features)} image(s), and KID needs 2 or "
                        f"more: it is damaged; compute it again (a cached reference: delete it, "
                        f"and fid.py remakes it)")
    if not all(np.isfinite(a).all() for a in arrays):
        raise UserError(f"{path} holds numbers that are not finite (NaN or inf): it is damaged; "
                        f"compute it again (a cached reference: delete it, and fid.py remakes it)")
    if np.abs(sigma - sigma.T).max(initial=0) > 1e-6 * np.abs(sigma).max(initial=0):
        raise UserError(f"{path}: sigma is not symmetric, so not a covariance: it is damaged; "
                        f"compute it again (a cached reference: delete it, and fid.py remakes it)")
    eigenvalues = np.linalg.eigvalsh(sigma)  # a covariance's are >= 0, but for rounding
    if eigenvalues[0] < -1e-6 * max(eigenvalues[-1], 0):
        raise UserError(f"{path}: sigma has an eigenvalue {eigenvalues[0]:.3g} < 0, so is not a "
                        f"covariance: it is damaged; compute it again (a cached reference: delete "
                        f"it, and fid.py remakes it)")
    return mu, sigma, features


# --------------------------------------------------------------------------------------------------
#                                   4. An experiment's FID: protocols, references, samples
# --------------------------------------------------------------------------------------------------

REF_SPLITS = {"heldout": ["val", "test"], "train": ["train"], "val": ["val"], "test": ["test"]}
# heldout: samples against the first of CelebA's val, then test images, on which the model was never
# trained (the first 10,000 of full CelebA's are all val) -- the default, and the honest comparison
# for small runs. published: 50,000 samples against the 162,770
# training images, as DDIM, PNDM and U-ViT report CelebA-64 FID: quote it only beside their numbers.
PROTOCOLS = {"heldout": {"num_samples": 10_000, "ref_split": "heldout", "ref_images": 10_000},
             "published": {"num_samples": 50_000, "ref_split": "train", "ref_images": 162_770}}


def choose_protocol(args):
    """Fill --num_samples, --ref_split and --ref_images from --protocol, and note whether
    --ref_images was given (ref_images_given). A value given that differs from the published
    protocol's is refused; with the held-out default it makes the run 'custom'."""
    preset = PROTOCOLS[args.protocol or "heldout"]
    given = {k: getattr(args, k) for k in preset if getattr(args, k) is not None}
    differ = [f"--{k} {v}" for k, v in given.items() if v != preset[k]]
    if args.protocol == "published" and differ:
        raise UserError(f"--protocol published compares 50000 samples with the 162770 training "
                        f"images; drop {', '.join(differ)}, or drop --protocol")
    for k, v in preset.items():
        setattr(args, k, given.get(k, v))
    args.ref_images_given = "ref_images" in given
    args.protocol = "custom" if differ else args.protocol or "heldout"


def quantized(images):
    """Images (B, 3, H, W) in [-1, 1] -> [0, 1] rounded to 8 bits: what a PNG of them holds."""
    return (celebgen.to_unit(images) * 255).round() / 255


def reference_statistics(train_args, model, args, device):
    """{mu, sigma, features, count, path} of the first --ref_images images of --ref_split, computed
    once and cached in experiments/fid_refs/ under a key of the data, split, count and weights."""
    sets = [celebgen.make_dataset(train_args, split, cache=False)
            for split in REF_SPLITS[args.ref_split]]
    count = min(args.ref_images, sum(len(s) for s in sets))  # check_references: at least 2
    # CelebA's: the folder and each file's name, size and time (the image cache's key), so that
    # images replaced in place are not scored against the old ones' statistics
    source = "toy" if train_args.dataset == "toy" else " ".join(
        celebgen.image_cache_path(s.files, s.size).name for s in sets)
    key = f"{source}|{args.ref_split}|{count}|{model.fingerprint}|kid"
    key = hashlib.sha1(key.encode()).hexdigest()[:10]
    crop = "" if train_args.dataset == "toy" else "_celeba-crop"  # toy faces are drawn whole
    path = Path("experiments") / "fid_refs" / (f"{train_args.dataset}_{args.ref_split}{crop}_"
                                               f"{train_args.image_size}px_n{count}_{key}.npz")
    if path.is_file():
        print(f"reference statistics from {path}")
        mu, sigma, features = npz_statistics(path)
        if features is None:  # fid.py's own caches hold them, for KID
            raise UserError(f"{path} holds no features, which KID needs: delete it, and fid.py "
                            f"remakes it")
    else:  # decodes only the `count` images used, a batch at a time, once each decodes whole
        # (the dataset would put the next image in place of an unreadable one, counting it twice)
        for f in [f for s in sets for f in getattr(s, "files", [])][:count]:  # toy faces: none
            open_image(f, decoded_size)
        images = itertools.islice((s[i] for s in sets for i in range(len(s))), count)
        batches = (quantized(batch) for batch in batched(images, args.batch_size))
        mu, sigma, features = feature_statistics(model, batches, count, device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with celebgen.written_whole(path) as tmp, open(tmp, "wb") as f:  # complete or absent
                np.savez(f, mu=mu, sigma=sigma, features=features)
        except OSError as e:  # a cache: the run goes on without it
            print(f"cannot cache the reference statistics in {path.parent} ({e.strerror or e}): "
                  f"they will be computed again next time", file=sys.stderr, flush=True)
    return {"mu": mu, "sigma": sigma, "features": features, "count": count, "path": path}


def result_path(checkpoint, exp_name):
    """Where the result goes: the experiment's fid.json for its own last.pt, fid_best.json for its
    best.pt (and so on), and e.g. fid_other_last.json for other/checkpoints/last.pt, so that no
    checkpoint's score replaces another's, nor passes for this experiment's."""
    stem = celebgen.checkpoint_stem(checkpoint, exp_name)  # prefixed unless the checkpoint is own
    name = "fid.json" if stem == "last" else f"fid_{stem}.json"
    return celebgen.experiment_paths(exp_name)["root"] / name


def check_references(train_args, args, result):
    """Refuse, before any slow step, references that cannot be: val or test images of a folder
    without a split file, fewer than 2 (FID needs 2 per side), fewer than --ref_images asks for,
    the run's images not found; and a result that cannot be written (at path `result`)."""
    exp = celebgen.experiment_paths(args.exp_name)
    celebgen.check_folders(exp["logs"], Path("experiments") / "fid_refs")
    celebgen.check_no_folder_at(result, "fid.py's result")
    celebgen.writable_folder(celebgen.existing_folder(exp["root"]))  # creates no folder
    if train_args.dataset == "celeba" and not Path(train_args.data_root).is_dir():
        raise UserError(f"the run trained on --data_root {train_args.data_root}, which is not a "
                        f"folder here, and its real images are the references; run fid.py where "
                        f"the run was trained, or compare two folders: fid.py SAMPLES IMAGES")
    if train_args.dataset == "celeba" and args.ref_split != "train":
        folder, split_file = celebgen.find_celeba(train_args.data_root)
        if split_file is None:
            raise UserError(f"{folder} has no split file, so its {args.ref_split} images are its "
                            f"training images; pass --ref_split train to compare with them "
                            f"anyway, or add list_eval_partition.txt")
    try:
        there = sum(len(celebgen.make_dataset(train_args, split, cache=False))
                    for split in REF_SPLITS[args.ref_split])
    except celebgen.EmptySplit as e:
        splits = (f" ({' and '.join(REF_SPLITS[args.ref_split])})" if args.ref_split == "heldout"
                  else "")
        raise UserError(f"{e}, or use another --ref_split than {args.ref_split}{splits}") from None
    if there < 2:
        raise UserError(f"--ref_split {args.ref_split} has {there} images, fewer than the 2 FID "
                        f"needs; use another --ref_split")
    if args.protocol == "published" and args.ref_images > there:
        raise UserError(f"--protocol published compares with CelebA's {args.ref_images} training "
                        f"images, and this run's data has {there}; drop --protocol")
    if args.ref_images_given and args.ref_images > there:
        raise UserError(f"--ref_images {args.ref_images} is more than the {there} images of "
                        f"--ref_split {args.ref_split}; use --ref_images {there} or fewer")


def sample_attributes(train_args, args):
    """A conditional model's requests (num_samples, K), cycling through the labels of those of the
    first --ref_images images of --ref_split that have any (else of the training split), so that
    the samples are asked for what the references show; and where they came from."""
    for split in (args.ref_split, "train"):
        sets = [celebgen.make_dataset(train_args, name, cache=False) for name in REF_SPLITS[split]]
        labels = itertools.islice((s.label(i) for s in sets for i in range(len(s))),
                                  args.ref_images)
        labelled = [label for label in labels if label.any()]
        if labelled:
            source = f"labels of {len(labelled)} {split} images"
            print(f"asking for the attributes {','.join(train_args.attributes)} with the {source}")
            return torch.stack(labelled)[torch.arange(args.num_samples) % len(labelled)], source
    raise UserError(f"no {args.ref_split} or train image has a row in the attribute file, so "
                    f"there are no labels to ask the conditional model for; use the attribute "
                    f"file the run was trained with")


def sample_scores(model, samples, num_samples, ref, device):
    """({fid, kid, kid_std}, Inception Score or None) of batches (B, 3, H, W) in [-1, 1], rounded to
    8 bits as their PNGs would be, against the reference statistics."""
    has_classifier = bool((model.classifier.weight != 0).any())
    score = InceptionScore(num_samples) if has_classifier else None
    batches = (quantized(batch) for batch in samples)
    mu, sigma, features = feature_statistics(model, batches, num_samples, device, score)
    if len(mu) != len(ref["mu"]):  # a cache edited or written by another program
        raise UserError(f"{ref['path']} holds statistics of {len(ref['mu'])} features, the samples "
                        f"have {len(mu)}: delete it, and fid.py remakes it")
    fid = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    kid, kid_std = kernel_inception_distance(features, ref["features"])
    if not has_classifier:
        print("Inception Score omitted: these Inception weights have no classifier (fc is zero)")
    return {"fid": fid, "kid": kid, "kid_std": kid_std}, score.score() if has_classifier else None


def write_result(result, path, exp_name):
    """The result at path (complete, or the previous one), and for a checkpoint of the experiment's
    own FID and KID in its TensorBoard logs at the checkpoint's step."""
    exp = celebgen.experiment_paths(exp_name)
    try:
        exp["root"].mkdir(parents=True, exist_ok=True)  # --checkpoint PATH: maybe a new experiment
        with celebgen.written_whole(path) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    except OSError as e:  # a read-only or full disk: the result is printed above
        raise UserError(f"cannot write {path} ({e.strerror or e}); the result is printed above; "
                        f"{celebgen.write_fix(e, exp['root'])} to keep it there") from None
    checkpoint = Path(result["checkpoint"])
    if celebgen.checkpoint_stem(checkpoint, exp_name) != checkpoint.stem:
        return  # another run's checkpoint: its step is not on this run's axis
    tag = f"fid/{result['num_samples']}_samples_{result['method']}{result['num_sampling_steps']}"
    number, power, guide = celebgen.name_number, result["time_power"], result["autoguidance"]
    tag += f"_power{number(power)}" if power is not None else ""
    tag += f"_cfg{number(result['cfg_scale'])}" if "attributes" in result else ""
    tag += f"_autoguidance{number(guide)}" if guide != 1 else ""
    logs = celebgen.TensorBoardLogs(exp["logs"], f"{path} is written")
    logs.add_scalar(tag, result["fid"], result["step"])
    logs.add_scalar(tag.replace("fid/", "kid/"), result["kid"], result["step"])
    logs.close()


def experiment_fid(args):
    """FID and KID (and IS) of the checkpoint's samples against real images, printed and written to
    the experiment's fid.json (result_path). The flags and the checkpoint are checked before the
    Inception weights load (slow)."""
    choose_protocol(args)
    times = celebgen.time_grid(args.num_sampling_steps, args.time_power)  # refused if unusable
    device, precision = celebgen.device_and_precision(args.device, args.precision)
    checkpoint = celebgen.checkpoint_path(args.exp_name, args.checkpoint)
    ckpt = celebgen.load_checkpoint(checkpoint)
    if args.cfg_scale is None:  # a conditional model is asked for labels: sample's weight for them
        args.cfg_scale = celebgen.GUIDANCE if ckpt["args"]["attributes"] else 1.0
    # a --cfg_scale needs a model trained with --attributes: refused now, before any work
    celebgen.attribute_rows([{}], [args.cfg_scale], ckpt["args"]["attributes"])
    dit = celebgen.load_model(ckpt, device)  # weights that do not fit fail here
    dit = celebgen.with_guide(dit, ckpt, checkpoint, args.autoguidance, device)  # and a guide's
    train_args = argparse.Namespace(**{**ckpt["args"], "download": False})  # reads, never fetches
    result_file = result_path(checkpoint, args.exp_name)
    check_references(train_args, args, result_file)
    attributes, source = (sample_attributes(train_args, args) if train_args.attributes
                          else (None, None))
    model = inception(args.inception_weights, device)  # the first slow step
    ref = reference_statistics(train_args, model, args, device)
    samples = celebgen.generate(dit, args, device, precision, attributes=attributes,
                                cfg_scale=args.cfg_scale)  # batch by batch
    scores, inception_score = sample_scores(model, samples, args.num_samples, ref, device)
    result = {**scores, "protocol": args.protocol, "num_samples": args.num_samples,
              "ref_images": ref["count"], "ref_split": args.ref_split, "step": ckpt["step"],
              "checkpoint": str(checkpoint), "num_sampling_steps": args.num_sampling_steps,
              "method": args.method, "time_power": args.time_power,
              "autoguidance": dit.weight if isinstance(dit, celebgen.Autoguided) else 1.0,
              "guide_step": getattr(dit, "guide_step", None),  # guide.pt's step, if guided
              "times": [round(t, 6) for t in times],
              "seed": args.seed,
              "device": device.type, "precision": precision, "reference": str(ref["path"]),
              "inception_weights": str(model.weights_file),
              "inception_sha256": model.weights_sha256, "kid_subsets": KID_SUBSETS,
              "kid_subset_size": min(KID_SUBSET_SIZE, args.num_samples, len(ref["features"]))}
    if attributes is not None:
        result.update(attributes=train_args.attributes, attribute_source=source,
                      cfg_scale=args.cfg_scale)
    if inception_score is not None:
        result["inception_score"] = inception_score
    print(json.dumps(result, indent=2))  # first, so that no failure below can lose the number
    write_result(result, result_file, args.exp_name)
    return result


# --------------------------------------------------------------------------------------------------
#                                   5. The command line
# --------------------------------------------------------------------------------------------------

def make_parser():
    parser = celebgen.Parser(prog="fid.py", description=(
        "Prints FID (as pytorch-fid computes it) and KID, and IS when the weights have a "
        "classifier: of an experiment's samples against real images (also written to its "
        "fid.json), or of two folders of images or .npz statistics (no IS; KID when both sides "
        "have features)."))
    arg = parser.add_argument
    arg("paths", nargs="*",
        help="two folders of images or .npz statistics to compare; a folder's images are the files "
             "pytorch-fid reads: extensions " + ", ".join(celebgen.IMAGE_EXTENSIONS) +
             " in lower case only")
    arg("--exp_name", type=celebgen.experiment_name,
        help="sample from this experiment and compare with real images")
    arg("--checkpoint", default="last.pt",
        help="a name in checkpoints/ (last.pt, best.pt) or a path, as in celebgen.py sample; the "
             "result of another experiment's is named after it (fid_other_last.json)")
    arg("--protocol", choices=list(PROTOCOLS),
        help="heldout (default): 10000 samples vs the first 10000 val, then test images; "
             "published: 50000 samples vs the 162770 training images, as published CelebA-64 FIDs")
    arg("--num_samples", type=celebgen.number(int, at_least=2),
        help="images to sample from the experiment (default: the protocol's)")
    arg("--num_sampling_steps", type=celebgen.positive(int), default=celebgen.SAMPLING_STEPS,
        help=celebgen.SAMPLING_STEPS_HELP)
    arg("--method", choices=celebgen.METHODS, default="euler", help=celebgen.METHOD_HELP)
    arg("--time_power", type=celebgen.TIME_POWER, help=celebgen.TIME_POWER_HELP)
    arg("--cfg_scale", type=celebgen.number(float, at_least=0),
        help=celebgen.GUIDANCE_HELP + "; a model trained with --attributes is asked for the "
             "reference images' own labels")
    arg("--autoguidance", type=celebgen.number(float, at_least=0),
        help=celebgen.AUTOGUIDANCE_HELP)
    arg("--seed", type=celebgen.SEED, default=0, help="seed of the noise")
    arg("--precision", choices=celebgen.PRECISIONS, default="auto",
        help=f"for sampling: {celebgen.PRECISION_HELP}")
    arg("--ref_split", choices=list(REF_SPLITS),
        help="real images to compare with (heldout = val + test; default: the protocol's)")
    arg("--ref_images", type=celebgen.number(int, at_least=2),
        help="this many real images (default: the protocol's, or all there are if fewer)")
    arg("--inception_weights", help=f"pytorch-fid's weights file (or set ${WEIGHTS_ENV})")
    arg("--batch_size", type=celebgen.positive(int), default=50,
        help="images per batch, for sampling and for Inception")
    arg("--device", choices=celebgen.DEVICES, default="auto",
        help=f"for sampling and Inception: {celebgen.DEVICE_HELP}")
    return parser


EXPERIMENT_FLAGS = ("checkpoint", "protocol", "num_samples", "num_sampling_steps", "method",
                    "time_power", "cfg_scale", "autoguidance", "seed", "precision", "ref_split",
                    "ref_images")  # the flags of an experiment's samples, which two paths ignore


def main(argv=None):
    args = celebgen.exit_on_user_error(make_parser().parse_args, argv)
    celebgen.exit_on_user_error(run, args)


def run(args):
    """fid.py --exp_name NAME, or fid.py PATH_A PATH_B."""
    if args.exp_name and args.paths:  # paths too, or e.g. --cfg_scale 0 1: a value read as a path
        raise UserError(f"--exp_name takes no paths, and {' '.join(args.paths)} "
                        f"{'were read as paths' if args.paths[1:] else 'was read as one'}: give "
                        f"either --exp_name or two paths, and one value per flag (see fid.py "
                        f"--help)")
    if not args.exp_name and len(args.paths) != 2:
        raise UserError("give either --exp_name or exactly two paths (see fid.py --help)")
    if args.exp_name:
        experiment_fid(args)
        return
    defaults = make_parser()
    given = [f"--{name}" for name in EXPERIMENT_FLAGS
             if getattr(args, name) != defaults.get_default(name)]
    if given:
        raise UserError(f"{', '.join(given)} apply to an experiment's samples (--exp_name); two "
                        f"paths are compared as they are: drop {'them' if given[1:] else 'it'}")
    paths_fid(args)


def paths_fid(args):
    """FID of two folders of images or .npz statistics, and KID when both sides have features.
    Both paths are checked (a folder's images decoded) before the Inception weights load (slow),
    which only a folder needs."""
    device = celebgen.pick_device(args.device)
    sources = [npz_statistics(p) if p.endswith(".npz") else folder_files(p) for p in args.paths]
    if not all(isinstance(source, tuple) for source in sources):  # a folder: features to extract
        for source in sources:  # an .npz against a folder: of pool3's 2048 features, or refused
            if isinstance(source, tuple) and len(source[0]) != 2048:
                raise UserError(f"the .npz holds statistics of {len(source[0])} features, and a "
                                f"folder gives Inception's 2048; compare statistics of the same "
                                f"layer")
        model = inception(args.inception_weights, device)

    def statistics(source):  # (mu, sigma, features or None) of an .npz, or of a folder's files
        if isinstance(source, tuple):
            return source
        batches = folder_batches(source, args.batch_size)
        return feature_statistics(model, batches, len(source), device)
    (mu1, sigma1, features1), (mu2, sigma2, features2) = map(statistics, sources)
    if mu1.shape != mu2.shape:
        raise UserError(f"the two sides have features of different dimensions ({len(mu1)} and "
                        f"{len(mu2)}); compare statistics of the same Inception layer")
    print(f"FID: {frechet_distance(mu1, sigma1, mu2, sigma2):.6f}")
    if features1 is not None and features2 is not None:  # pytorch-fid's .npz has no features
        print("KID: {:.6f} +- {:.6f}".format(*kernel_inception_distance(features1, features2)))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt, handled
    celebgen.hang_up_as_ctrl_c()  # a closed terminal, too
    main()
