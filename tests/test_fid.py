"""fid.py: the Frechet distance in closed-form cases, and agreement with pytorch-fid (the reference)."""
import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import celebgen as cg
import fid
from conftest import ROOT
from test_training import TOY, cli, labelled_celeba, logged_scalars, random_image_folder


def test_identical_statistics_have_zero_distance():
    """Also from singular covariances (40 images of 64 features), whose rounding alone would put the
    distance a hair below 0: never negative."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 64))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    few = a[:40]
    mu, sigma = few.mean(0), np.cov(few, rowvar=False)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == 0.0


def test_unit_mean_shift_in_2048_dimensions_is_2048():
    eye = np.eye(2048)
    assert fid.frechet_distance(np.zeros(2048), eye, np.ones(2048), eye) == pytest.approx(2048, abs=1e-9)


def test_statistics_that_are_not_finite_are_refused_not_rooted():
    """scipy's sqrtm of a NaN matrix of 2048 x 2048 may never return (and Ctrl-C cannot stop it)."""
    mu, sigma, inf = np.zeros(4), np.eye(4), np.full((4, 4), np.inf)
    for args in [(mu + np.nan, sigma, mu, sigma), (mu, sigma, mu, inf)]:
        with pytest.raises(ValueError, match="not finite"):
            fid.frechet_distance(*args)


def test_diagonal_covariances_match_the_closed_form():
    """For diagonal covariances, Tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 100), rng.uniform(0.1, 3, 100)
    mu1, mu2 = rng.standard_normal(100), rng.standard_normal(100)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_a_complex_root_of_singular_covariances_keeps_its_real_part():
    """Covariances of 3 images in 6 dimensions: scipy's root of their product comes out complex, with a
    negative diagonal entry. Tr((S1 S2)^(1/2)) is the sum of the roots of S1 S2's eigenvalues (real, >= 0)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    sigma1, sigma2, mu1, mu2 = a @ a.T, b @ b.T, np.zeros(6), np.ones(6)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    assert np.iscomplexobj(root) and (np.diagonal(root).real < 0).any()  # the case under test
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real.clip(0)
    expected = 6 + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum()
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_running_statistics_equal_np_cov_of_all_features_at_once(capsys):
    """Batches of uneven sizes, features far from zero (where a one-pass sum of squares would cancel)."""
    features = np.random.default_rng(2).normal(1000, 0.01, (103, 40)).astype(np.float32)
    stats = fid.RunningStatistics()
    for start, stop in ((0, 1), (1, 50), (50, 52), (52, 103)):
        stats.add(features[start:stop])
    mu, sigma = stats.mean_and_covariance()
    assert capsys.readouterr().err == ""  # 103 features of 40 numbers: a covariance of full rank
    expected = features.astype(np.float64)
    assert stats.count == 103 and np.allclose(mu, expected.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(sigma, np.cov(expected, rowvar=False), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("count,singular", [(40, True), (41, False)])
def test_fid_warns_when_the_covariance_is_singular(count, singular, capsys):
    """N features of D numbers span at most N - 1 dimensions: singular for N <= D. One line."""
    stats = fid.RunningStatistics()
    features = np.random.default_rng(0).normal(size=(count, 40))
    stats.add(features)
    assert (np.linalg.matrix_rank(np.cov(features, rowvar=False)) < 40) == singular
    stats.mean_and_covariance()
    assert [line.split(":")[:2] for line in capsys.readouterr().err.splitlines()] == (
        [["warning", f" FID from {count} images, no more than the 40 features"]] if singular else [])


def test_inception_score_streamed_equals_the_direct_formula():
    """exp(mean_x KL(p(y|x) || p(y))), averaged over 10 consecutive chunks, all softmaxes at once."""
    logits = torch.randn(53, 1008, generator=torch.Generator().manual_seed(3)) * 4
    p = logits.double().softmax(1).numpy()
    direct = np.mean([np.exp(np.mean(np.sum(c * (np.log(c + 1e-12) - np.log(c.mean(0) + 1e-12)), 1)))
                      for c in np.array_split(p, 10)])
    score = fid.InceptionScore(53)
    for start in range(0, 53, 7):  # batches that straddle the chunks' borders
        score.add(logits[start:start + 7])
    assert score.score() == pytest.approx(direct, rel=1e-12)


def direct_kid(x, y):
    """MMD^2_u written pair by pair: the slow formula the vectorized KID must equal."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2


def test_kid_equals_the_direct_formula():
    """With m rows per side every subset is the whole set, reordered, which MMD^2_u does not see."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(0, 1, (9, 5)), rng.normal(1.5, 1.2, (9, 5))
    mean, std = fid.kernel_inception_distance(x, y, subsets=3, subset_size=9)
    assert mean == pytest.approx(direct_kid(x, y), rel=1e-12) and std < 1e-12 and mean > 0


def test_kid_of_one_distribution_is_zero_within_its_spread():
    """Unbiased: two samples of one distribution give ~0, within the spread over subsets and far below a
    shift of 0.2 standard deviations. A set against itself gives ~0 too (slightly below: an image drawn on
    both sides adds its own k(x, x) to the cross term only, an O(1/m) effect)."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(0, 1, (3000, 32)), rng.normal(0, 1, (3000, 32))
    same, same_std = fid.kernel_inception_distance(x, y, subsets=50, subset_size=500)
    itself, _ = fid.kernel_inception_distance(x, x.copy(), subsets=50, subset_size=500)
    shifted, _ = fid.kernel_inception_distance(x, y + 0.2, subsets=50, subset_size=500)
    assert abs(same) < same_std and abs(same) < 0.05 * shifted and abs(itself) < 0.05 * shifted


def test_kid_draws_each_subset_from_all_of_each_side():
    """With 40 rows against 10, KID's subsets of 10 are drawn from all 40: reordering the 40 rows, whose
    first 10 lie far from y, changes it only by the draws' noise."""
    rng = np.random.default_rng(6)
    y, near = rng.normal(0, 1, (10, 8)), rng.normal(0, 1, (30, 8))
    x = np.concatenate([rng.normal(3, 1, (10, 8)), near])
    forward, _ = fid.kernel_inception_distance(x, y, subsets=1000, subset_size=10)
    backward, _ = fid.kernel_inception_distance(x[::-1].copy(), y, subsets=1000, subset_size=10)
    assert forward == pytest.approx(backward, rel=0.15)


def test_the_inception_score_is_of_the_logits_and_fid_of_the_features():
    """feature_statistics feeds the network's features to the statistics and its logits to the score."""
    features = torch.arange(24.0).view(6, 4) ** 0.5
    logits = -torch.arange(30.0).view(6, 5)
    scored = []
    score = types.SimpleNamespace(add=scored.append)  # an InceptionScore's one method, recording
    mu, _, kept = fid.feature_statistics(lambda batch: (features, logits), [torch.zeros(6, 3, 8, 8)], 6,
                                         torch.device("cpu"), score)
    assert torch.equal(torch.cat(scored), logits) and np.allclose(mu, features.mean(0).numpy())
    assert np.array_equal(kept, features.numpy())


def recording_network(seen):
    """A stand-in for FIDFeatures that appends each batch it is fed to `seen`: one feature per pixel of
    channel 0's first row, and 5 logits of 0."""
    def network(batch):
        seen.append(batch)
        return batch[:, 0, 0].double(), torch.zeros(len(batch), 5)
    network.fingerprint = "recorder"
    return network


def test_the_references_are_the_first_ref_images_of_the_split_and_no_more(workdir):
    """reference_statistics feeds the network the first --ref_images held-out images (val, then test),
    and no more, a batch at a time: here 10 of the toy faces' 50,000 val images."""
    seen = []
    network = recording_network(seen)
    train_args = argparse.Namespace(dataset="toy", image_size=8, attributes=[])
    args = argparse.Namespace(ref_split="heldout", ref_images=10, batch_size=4)
    ref = fid.reference_statistics(train_args, network, args, torch.device("cpu"))
    val = cg.make_dataset(train_args, "val")
    expected = fid.quantized(torch.stack([val[i] for i in range(10)]))              # (10, 3, 8, 8)
    assert ref["count"] == 10 and [len(b) for b in seen] == [4, 4, 2] and torch.equal(torch.cat(seen), expected)
    assert np.allclose(ref["mu"], expected[:, 0, 0].double().mean(0).numpy())


def test_held_out_references_are_val_then_test_never_train(workdir):
    """CelebA's official split of 7 images: 4 held-out references are the 2 val images, then the 2 test
    images, each in file order; no training image."""
    (workdir / "celeba").mkdir()
    random_image_folder(workdir / "celeba" / "img_align_celeba", 7)
    split = [0, 1, 2, 0, 1, 2, 0]  # 000-006.png: train, val, test, train, val, test, train
    (workdir / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{i:03d}.png {s}\n" for i, s in enumerate(split)))
    seen = []
    network = recording_network(seen)
    train_args = argparse.Namespace(dataset="celeba", data_root="celeba", image_size=8, attributes=[],
                                    download=False)
    args = argparse.Namespace(ref_split="heldout", ref_images=4, batch_size=8)
    assert fid.reference_statistics(train_args, network, args, torch.device("cpu"))["count"] == 4
    expected = [cg.to_signed(cg.load_pixels(workdir / "celeba" / "img_align_celeba" / f"{i:03d}.png", 8))
                for i in (1, 4, 2, 5)]  # val, val, test, test
    assert torch.equal(torch.cat(seen), fid.quantized(torch.stack(expected)))
    # data without test images (a subset of train and val): the val images are the way out
    (workdir / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{i:03d}.png {min(s, 1)}\n" for i, s in enumerate(split)))
    args = argparse.Namespace(**vars(args), exp_name="x", protocol="custom", ref_images_given=False)
    with pytest.raises(cg.UserError, match=r"no test images in .*; check that the split file belongs to these "
                       r"images, or use another --ref_split than heldout \(val and test\)$"):
        fid.check_references(train_args, args, Path("fid.json"))
    args.ref_split = "val"
    fid.check_references(train_args, args, Path("fid.json"))
    train_args.attributes = ["Smiling"]  # no attribute file: another split is no fix
    with pytest.raises(cg.UserError, match="list_attr_celeba") as e:
        fid.check_references(train_args, args, Path("fid.json"))
    assert "--ref_split" not in str(e.value)


def test_each_data_folder_caches_its_own_references(workdir):
    """Two folders of as many images, other images: the second's references are its own, not the first's
    from the cache (whose key names the folder); and images replaced in place get new references."""
    network = recording_network([])
    random_image_folder(workdir / "a", 4)
    random_image_folder(workdir / "b", 5)
    (workdir / "b" / "000.png").unlink()  # b: the images a has from its second on, and one more
    args = argparse.Namespace(ref_split="heldout", ref_images=4, batch_size=4)
    refs = [fid.reference_statistics(argparse.Namespace(dataset="celeba", data_root=folder, image_size=8,
                                                        attributes=[], download=False),
                                     network, args, torch.device("cpu")) for folder in ("a", "b", "a")]
    assert refs[0]["path"] != refs[1]["path"] and not np.allclose(refs[0]["mu"], refs[1]["mu"])
    assert refs[2]["path"] == refs[0]["path"] and np.array_equal(refs[2]["mu"], refs[0]["mu"])  # cached
    for f in sorted((workdir / "a").iterdir()):  # a's images replaced in place by others, as large
        with Image.open(f) as image:
            pixels = np.asarray(image)
        Image.fromarray(255 - pixels).save(f)
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # later, on any disk
    again = fid.reference_statistics(argparse.Namespace(dataset="celeba", data_root="a", image_size=8,
                                                        attributes=[], download=False),
                                     network, args, torch.device("cpu"))
    assert again["path"] != refs[0]["path"] and not np.allclose(again["mu"], refs[0]["mu"])


def test_an_unreadable_reference_image_is_refused_before_inception(workdir):
    """A reference image cut short after its header would be replaced by the next image, which the
    statistics would then count twice: refused in one line, before any image reaches Inception and
    before anything is cached; an unreadable image past --ref_images is not read."""
    seen = []
    network = recording_network(seen)
    random_image_folder(workdir / "a", 5)
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(workdir / "a" / "001.png")
    cut = (workdir / "a" / "001.png").read_bytes()
    (workdir / "a" / "001.png").write_bytes(cut[:len(cut) // 2])
    train_args = argparse.Namespace(dataset="celeba", data_root="a", image_size=8, attributes=[],
                                    download=False)
    args = argparse.Namespace(ref_split="heldout", ref_images=4, batch_size=4)
    with pytest.raises(cg.UserError, match=r"^cannot read image a/001.png \(.*\); remove or replace it$"):
        fid.reference_statistics(train_args, network, args, torch.device("cpu"))
    assert not seen and not (workdir / "experiments" / "fid_refs").exists()
    (workdir / "a" / "001.png").rename(workdir / "a" / "009.png")  # now the fifth: not a reference
    assert fid.reference_statistics(train_args, network, args, torch.device("cpu"))["count"] == 4


def test_a_conditional_model_is_asked_only_for_labels_the_references_have(tmp_path):
    """Images without a row in the attribute file (all attributes 0) are not requests: of the 20
    training images of labelled_celeba (its 4 val images have none), the 15 with rows are cycled."""
    labelled_celeba(tmp_path / "celeba")
    train_args = argparse.Namespace(dataset="celeba", data_root=str(tmp_path / "celeba"), image_size=16,
                                    attributes=["Smiling", "Male"], download=False)
    args = argparse.Namespace(ref_split="val", ref_images=20, num_samples=30)
    asked, source = fid.sample_attributes(train_args, args)
    train = cg.make_dataset(train_args, "train", cache=False)
    assert source == "labels of 15 train images" and asked.shape == (30, 2)
    assert torch.equal(asked, torch.stack([train.label(i % 15) for i in range(30)])) and asked.abs().min() == 1


def test_a_conditional_model_whose_attribute_file_names_no_image_is_refused(tmp_path):
    labelled_celeba(tmp_path / "celeba")
    attribute_file = tmp_path / "celeba" / "list_attr_celeba.txt"
    attribute_file.write_text(attribute_file.read_text().replace(".png ", ".jpg "))  # rows of other images
    train_args = argparse.Namespace(dataset="celeba", data_root=str(tmp_path / "celeba"), image_size=16,
                                    attributes=["Smiling"], download=False)
    args = argparse.Namespace(ref_split="val", ref_images=20, num_samples=30)
    with pytest.raises(cg.UserError, match="no val or train image has a row in the attribute file, so there "
                       "are no labels to ask the conditional model for; use the attribute file the run"):
        fid.sample_attributes(train_args, args)


def test_feature_sample_keeps_a_uniform_sample():
    """Every vector is kept with probability capacity / N, whatever the batches (here: 10 of 40, 400 seeds,
    so each frequency is 0.25 +- 0.022); up to the capacity, everything is kept in order."""
    vectors = np.arange(40, dtype=np.float32)[:, None]
    kept = np.zeros(40)
    for seed in range(400):
        sample = fid.FeatureSample(capacity=10, seed=seed)
        for start in range(0, 40, 7):
            sample.add(vectors[start:start + 7])
        assert sample.seen == 40 and len(set(sample.features()[:, 0])) == 10
        kept[sample.features()[:, 0].astype(int)] += 1
    assert np.all(np.abs(kept / 400 - 0.25) < 0.1), kept / 400
    # one place for 3 vectors: each is the one kept with probability 1/3 (600 seeds: +- 0.019)
    last = [fid.FeatureSample(capacity=1, seed=seed) for seed in range(600)]
    for sample in last:
        sample.add(vectors[:3])
    frequencies = np.bincount([int(sample.features()[0, 0]) for sample in last], minlength=3) / 600
    assert np.all(np.abs(frequencies - 1 / 3) < 0.08), frequencies
    small = fid.FeatureSample(capacity=50)
    small.add(vectors)
    assert np.array_equal(small.features(), vectors)


@pytest.mark.parametrize("flags,expected", [
    ([], ("heldout", 10_000, "heldout", 10_000)),
    (["--protocol", "published"], ("published", 50_000, "train", 162_770)),
    (["--num_samples", "1000", "--ref_images", "1440"], ("custom", 1000, "heldout", 1440)),
    (["--protocol", "heldout", "--num_samples", "10000"], ("heldout", 10_000, "heldout", 10_000)),
])
def test_protocols_fill_the_counts_and_split(flags, expected):
    args = fid_parser_args(flags)
    fid.choose_protocol(args)
    assert (args.protocol, args.num_samples, args.ref_split, args.ref_images) == expected


def test_the_published_protocol_refuses_other_counts(capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(["--exp_name", "x", "--protocol", "published", "--num_samples", "1000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--protocol published compares 50000 samples" in err and "--num_samples 1000" in err


def test_the_published_protocol_refuses_a_run_without_all_training_images(workdir, capsys):
    """Toy faces have 50,000 training images, not CelebA's 162,770: no number is called published."""
    assert cli(capsys, "train", "--exp_name", "tiny", *TOY, "--batch_size", 4, "--max_steps", 1)[0] == 0
    with pytest.raises(SystemExit) as e:
        fid.main(["--exp_name", "tiny", "--protocol", "published", "--inception_weights", "nothing_loaded"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--protocol published compares with CelebA's 162770 training images, and this run's data has " \
           "50000; drop --protocol" in err


class Scorer(torch.nn.Module):
    """Stands in for FIDFeatures: 8 features per image, and 4 logits from its classifier's weights."""

    def __init__(self, classifier_weight):
        super().__init__()
        self.classifier = torch.nn.Linear(8, 4, bias=False).requires_grad_(False)
        self.classifier.weight.data.copy_(classifier_weight)

    def forward(self, images):
        features = images.flatten(1)[:, :8]
        return features.double(), features @ self.classifier.weight.T


def test_weights_without_a_classifier_give_no_inception_score(capsys):
    """Weights whose classifier is all zero (FID weights may come without one) give no IS, which would be
    exactly 1 (a uniform p(y|x)), and a line says so; weights with a classifier give an IS above 1."""
    generator = torch.Generator().manual_seed(0)
    samples = [torch.rand(10, 3, 4, 4, generator=generator) * 2 - 1 for _ in range(4)]  # IS: 10 chunks of 4
    reference = torch.rand(12, 8, generator=generator).double().numpy()
    ref = {"mu": reference.mean(0), "sigma": np.cov(reference, rowvar=False), "features": reference,
           "path": Path("ref.npz")}
    scores, inception_score = fid.sample_scores(Scorer(torch.zeros(4, 8)), iter(samples), 40, ref, "cpu")
    assert inception_score is None and scores["fid"] > 0
    assert "Inception Score omitted: these Inception weights have no classifier" in capsys.readouterr().out
    weight = 5 * torch.randn(4, 8, generator=generator)
    scores, inception_score = fid.sample_scores(Scorer(weight), iter(samples), 40, ref, "cpu")
    assert inception_score > 1 and "omitted" not in capsys.readouterr().out


def test_the_inception_score_s_logits_leave_out_the_classifier_s_bias():
    """As the Inception Score's original code and torchmetrics' "logits_unbiased": features @ W^T."""
    state = fid.fid_inception().state_dict()
    state["fc.bias"] = 10 * torch.randn(1008)
    model = fid.FIDFeatures(state)
    features, logits = model(torch.rand(2, 3, 8, 8))
    assert torch.allclose(logits, features @ state["fc.weight"].T, atol=1e-4)
    assert not torch.allclose(logits.softmax(1), model.classifier(features).softmax(1), atol=1e-2)


def fid_parser_args(flags):
    """fid.py's parsed arguments, without running it."""
    captured = {}
    original = fid.run
    fid.run = lambda args: captured.setdefault("args", args)
    try:
        fid.main(["--exp_name", "x", *flags])
    finally:
        fid.run = original
    return captured["args"]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A random FID Inception in pytorch-fid's file format: no download needed. Convolutions get He-normal
    weights (activations keep their scale through 94 layers) and batch norms random statistics."""
    torch.manual_seed(0)
    state = fid.fid_inception().state_dict()
    for name, tensor in state.items():
        if name.endswith("conv.weight"):
            tensor.normal_(0, math.sqrt(2 / tensor[0].numel()))
        elif name.endswith(("running_var", "bn.weight")):
            tensor.uniform_(0.5, 1.5)
        elif name.endswith(("running_mean", "bn.bias")):
            tensor.normal_(0, 0.1)
        elif name.startswith("fc."):
            tensor.normal_(0, 0.01)
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def reference(random_weights):
    """pytorch-fid's InceptionV3 with the same weights, loaded as its README for offline use describes."""
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    state = torch.load(random_weights, weights_only=True)
    original = pytorch_fid_inception.load_state_dict_from_url
    pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    yield pytorch_fid_inception.InceptionV3([3]).eval()
    pytorch_fid_inception.load_state_dict_from_url = original


def image_folders(root, n=24, size=32):
    rng = np.random.default_rng(0)
    folders = [root / "a", root / "b"]
    for k, folder in enumerate(folders):
        folder.mkdir()
        for i in range(n):
            base = rng.integers(0, 256, 3) if k == 0 else rng.integers(60, 200, 3)
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folders


def test_features_match_pytorch_fid(random_weights, reference):
    images = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    ours, _ = fid.FIDFeatures(torch.load(random_weights, weights_only=True))(images)
    with torch.no_grad():
        theirs = reference(images)[0].flatten(1)
    assert theirs.abs().max() > 0.1  # the random network does produce sizeable features
    # equal up to float32 rounding: channels-last convolutions sum in another order
    assert (ours - theirs).abs().max() < 1e-6 * theirs.abs().max()


@pytest.mark.filterwarnings("ignore:.*disp.*:DeprecationWarning", "ignore:Matrix is singular")  # pytorch-fid's sqrtm call
def test_fid_of_two_folders_matches_pytorch_fid(tmp_path, random_weights, reference, capsys):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    a, b = image_folders(tmp_path)
    fid.main([str(a), str(b), "--inception_weights", str(random_weights), "--batch_size", "8"])
    out, err = capsys.readouterr()
    assert err.count("images, no more than the 2048 features") == 2
    ours, (kid, kid_std) = float(out.split("FID:")[1].split()[0]), map(float, out.split("KID:")[1].split("+-"))
    features = [fid_score.get_activations(sorted(map(str, folder.glob("*.png"))), reference, batch_size=8,
                                          dims=2048, device="cpu", num_workers=0) for folder in (a, b)]
    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in features]  # as calculate_activation_statistics
    with np.errstate(all="ignore"):
        theirs = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
    assert ours > 0 and ours == pytest.approx(theirs, rel=1e-5)
    # 24 images a side: every KID subset is all of them, so KID is the direct formula on their features
    assert kid > 0 and kid == pytest.approx(direct_kid(*features), rel=1e-4) and kid_std < 1e-6 * kid


def test_a_closed_terminal_stops_fid_py_as_ctrl_c_does(workdir, capsys, random_weights):
    """SIGHUP (the terminal closed) while fid.py samples: one line, status 130, and no fid.json."""
    assert cli(capsys, "train", "--exp_name", "tiny", *TOY, "--batch_size", 4, "--max_steps", 2)[0] == 0
    run = subprocess.Popen([sys.executable, str(ROOT / "fid.py"), "--exp_name", "tiny", "--num_samples", "2000",
                            "--num_sampling_steps", "2", "--ref_images", "6", "--batch_size", "1",
                            "--inception_weights", str(random_weights)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:
        if line.startswith("sampled 2/"):
            break
    run.send_signal(signal.SIGHUP)
    _, err = run.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert run.returncode == 130 and "Traceback" not in err and last.startswith("interrupted ("), err
    assert not (workdir / "experiments/tiny/fid.json").exists()


def test_cli_writes_fid_json_for_an_experiment(workdir, capsys, random_weights):
    assert cli(capsys, "train", "--exp_name", "tiny", *TOY, "--batch_size", 4, "--max_steps", 2)[0] == 0
    argv = ["--exp_name", "tiny", "--checkpoint", "last.pt", "--num_samples", "6", "--num_sampling_steps", "2",
            "--ref_images", "6", "--inception_weights", str(random_weights), "--batch_size", "6"]
    fid.main(argv)
    err = capsys.readouterr().err  # progress as whole lines, which interleave with the sampler's
    progress = [line for line in err.splitlines() if not line.startswith("warning: FID from 6 images")]
    assert "\r" not in err and "Inception features: 6/6 images" in progress[-1], err
    result = json.loads((workdir / "experiments" / "tiny" / "fid.json").read_text())
    assert result["step"] == 2 and result["num_samples"] == 6 and math.isfinite(result["fid"]) and result["fid"] > 0
    assert "inception_score" in result  # these random weights have a (random) classifier
    assert result["protocol"] == "custom" and result["ref_images"] == 6 and result["ref_split"] == "heldout"
    assert result["inception_sha256"] == hashlib.sha256(random_weights.read_bytes()).hexdigest()
    assert result["device"] == "cpu" and result["precision"] in ("fp32", "bf16") and result["kid_subset_size"] == 6
    assert result["kid"] > 0 and result["kid_std"] >= 0, result  # 2-step samples are far from the faces
    guide = torch.load(workdir / "experiments/tiny/checkpoints/guide.pt", weights_only=True)
    assert result["autoguidance"] == 1.5 and result["guide_step"] == guide["step"] == 1  # 25% of 2 steps
    cached = list((workdir / "experiments" / "fid_refs").glob("toy_heldout_16px_n6_*.npz"))  # toy faces: no crop in the name
    assert len(cached) == 1
    fid.main(argv)  # the second run reads the cached reference statistics
    assert "reference statistics from" in capsys.readouterr().out
    fid.main([*argv, "--time_power", "1"])
    powered = json.loads((workdir / "experiments" / "tiny" / "fid.json").read_text())
    assert powered["times"] == [0, 0.5, 1] != result["times"]  # uniform; by default 2 steps take p = 2
    # TensorBoard: each setting's FID and KID under its own tags, at the checkpoint's step (autoguided by
    # the run's guide.pt, as by default)
    logs, guided = workdir / "experiments" / "tiny" / "logs", "_autoguidance1.5"
    assert logged_scalars(logs, f"fid/6_samples_euler2{guided}")[-1].value == pytest.approx(result["fid"], rel=1e-6)
    assert logged_scalars(logs, f"kid/6_samples_euler2{guided}")[-1].value == pytest.approx(result["kid"], rel=1e-6)
    powered_fid = logged_scalars(logs, f"fid/6_samples_euler2_power1{guided}")[-1]
    assert powered_fid.step == 2 and powered_fid.value == pytest.approx(powered["fid"], rel=1e-6)
    # best.pt's score beside last.pt's, not over it
    fid.main([*argv, "--checkpoint", "best.pt", "--autoguidance", "1"])
    best = json.loads((workdir / "experiments" / "tiny" / "fid_best.json").read_text())
    assert best["checkpoint"].endswith("best.pt") and best["autoguidance"] == 1 and best["guide_step"] is None
    assert json.loads((workdir / "experiments" / "tiny" / "fid.json").read_text()) == powered
    assert logged_scalars(logs, "fid/6_samples_euler2")[-1].value == pytest.approx(best["fid"], rel=1e-6)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # its traceback
def test_a_disk_that_refuses_the_logs_leaves_the_grid_and_fid_json_written(workdir, capsys, monkeypatch,
                                                                          random_weights):
    """sample --grid and fid.py log to TensorBoard after writing their result: logs that cannot be
    written are said in one line, the result is kept, the exit status is 0."""
    assert cli(capsys, "train", "--exp_name", "tiny", *TOY, "--batch_size", 4, "--max_steps", 2)[0] == 0
    from tensorboard.summary.writer import record_writer

    def full(self, data):  # in TensorBoard's writer thread; the next write raises it again
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    logs = "cannot write the TensorBoard logs in experiments/tiny/logs (No space left on device); "
    code, _, err = cli(capsys, "sample", "--exp_name", "tiny", "--grid", "--num_sampling_steps", 1)
    grid = workdir / "experiments/tiny/samples/last_grid_euler1_seed0.png"
    assert code == 0 and err == f"{logs}{grid.relative_to(workdir)} is written\n" and grid.is_file(), err
    fid.main(["--exp_name", "tiny", "--num_samples", "6", "--num_sampling_steps", "1", "--ref_images", "6",
              "--inception_weights", str(random_weights)])
    assert f"{logs}experiments/tiny/fid.json is written\n" in capsys.readouterr().err
    assert json.loads((workdir / "experiments/tiny/fid.json").read_text())["num_sampling_steps"] == 1


def test_an_experiments_fid_is_that_of_its_sample_pngs_against_the_reference_pngs(workdir, capsys,
                                                                                 random_weights):
    """fid.py --exp_name computes, without writing an image, what the two-folder FID (the pytorch-fid
    path) gives for the PNGs `celebgen.py sample` writes of the same checkpoint and noise, against PNGs
    of the first --ref_images held-out images: the same sampler, EMA weights, 8-bit rounding and
    references, so the same FID and KID."""
    assert cli(capsys, "train", "--exp_name", "e", *TOY, "--batch_size", 4, "--max_steps", 3)[0] == 0
    common = ["--exp_name", "e", "--checkpoint", "last.pt", "--num_sampling_steps", "2", "--precision",
              "fp32", "--batch_size", "4"]
    fid.main([*common, "--num_samples", "6", "--ref_images", "6", "--inception_weights",
              str(random_weights)])
    result = json.loads((workdir / "experiments" / "e" / "fid.json").read_text())
    assert cli(capsys, "sample", *common, "--num_samples", 6)[0] == 0
    references = workdir / "references"
    references.mkdir()
    held_out = cg.ToyFaces(16, offset=10**6)  # val; its first 6 images are the first 6 of val + test
    for i in range(6):
        cg.save_png(cg.to_unit(held_out[i]), references / f"{i:03d}.png")
    capsys.readouterr()
    fid.main([str(workdir / "experiments/e/samples/last_euler2_seed0"), str(references),
              "--inception_weights", str(random_weights)])
    out = capsys.readouterr().out
    folder_fid, (folder_kid, _) = float(out.split("FID:")[1].split()[0]), map(float, out.split("KID:")[1].split("+-"))
    assert result["fid"] == pytest.approx(folder_fid, rel=1e-6) and result["kid"] == pytest.approx(folder_kid, rel=1e-5)


def test_a_conditional_model_is_asked_for_the_references_labels(workdir, capsys, random_weights, monkeypatch):
    """fid.py asks a model trained with --attributes for the labels of the reference images (the first
    --ref_images of val + test, cycled over the samples) at --cfg_scale (by default sample's weight for
    a request, GUIDANCE), and fid.json records it; an unconditional model refuses --cfg_scale before any
    work."""
    code, _, err = cli(capsys, "train", "--exp_name", "cond", *TOY, "--attributes", "Smiling,Wearing_Hat",
                       "--batch_size", 4, "--max_steps", 2)
    assert code == 0, err
    asked, generate = [], cg.generate
    monkeypatch.setattr(cg, "generate", lambda *a, **k: asked.append(k) or generate(*a, **k))
    argv = ["--exp_name", "cond", "--checkpoint", "last.pt", "--num_samples", "7", "--num_sampling_steps", "2",
            "--ref_images", "5", "--inception_weights", str(random_weights), "--batch_size", "7", "--cfg_scale", "2.5"]
    fid.main(argv)
    val = cg.ToyFaces(16, offset=10**6, attributes=["Smiling", "Wearing_Hat"])
    labels = torch.stack([val.label(i) for i in range(5)])
    assert torch.equal(asked[0]["attributes"], labels[[0, 1, 2, 3, 4, 0, 1]]) and asked[0]["cfg_scale"] == 2.5
    result = json.loads((workdir / "experiments" / "cond" / "fid.json").read_text())
    assert result["attributes"] == ["Smiling", "Wearing_Hat"] and result["cfg_scale"] == 2.5
    assert result["attribute_source"] == "labels of 5 heldout images"
    fid.main(argv[:-2])  # no --cfg_scale
    assert asked[1]["cfg_scale"] == cg.GUIDANCE != 1
    assert json.loads((workdir / "experiments" / "cond" / "fid.json").read_text())["cfg_scale"] == cg.GUIDANCE
    assert cli(capsys, "train", "--exp_name", "plain", *TOY, "--batch_size", 4, "--max_steps", 1)[0] == 0
    with pytest.raises(SystemExit) as exit:
        fid.main(["--exp_name", "plain", "--checkpoint", "last.pt", "--cfg_scale", "2"])
    assert exit.value.code == 2 and "trained without --attributes" in capsys.readouterr().err


def test_missing_or_wrong_weights_fail_with_a_clear_message(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty download cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    a, b = image_folders(tmp_path, n=2)

    def error(*flags):
        with pytest.raises(SystemExit) as e:
            fid.main([str(a), str(b), *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
        return err
    err = error()
    assert "cannot download the FID Inception weights" in err and "--inception_weights" in err
    assert "do not exist" in error("--inception_weights", str(tmp_path / "nope.pth"))
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("not weights")
    assert "notes.txt is unreadable (UnpicklingError), not the FID Inception weights; pass" in \
        error("--inception_weights", str(not_torch))
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)  # a PyTorch file, but not the Inception's names
    assert "other.pth holds other weights" in error("--inception_weights", str(other))
    torch.save(None, other)  # a PyTorch file that holds nothing
    assert "other.pth holds other weights" in error("--inception_weights", str(other))
    state = fid.fid_inception().state_dict()
    next(iter(state.values())).view(-1)[5] = float("nan")  # right names and shapes; one number
    torch.save(state, other)
    assert "other.pth holds numbers that are not finite (NaN or inf): it is damaged; pass " \
        "pytorch-fid's file" in error("--inception_weights", str(other))
    next(iter(state.values())).view(-1)[5] = 0.0
    state["Conv2d_1a_3x3.bn.running_var"][0] = -1.0  # finite, but sqrt(-1 + eps) is NaN
    torch.save(state, other)
    assert f"Inception network gave features that are not finite (NaN or inf): its weights {other} are " \
        "damaged" in error("--inception_weights", str(other))
    cached = fid.weights_file()  # a corrupt file where the download is kept
    assert cached.parent.is_dir() and not cached.exists()  # the failed download left no file
    cached.write_bytes(other.read_bytes()[:100])
    assert "is unreadable" in error() and "delete it, and the next run downloads it again" in error()
    monkeypatch.setenv("TORCH_HOME", str(not_torch))  # a download cache that cannot be made
    assert f"cannot write in {not_torch}/hub/checkpoints (Not a directory)" in error()
