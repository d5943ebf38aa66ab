"""The CelebA loader in every supported layout, its image cache, the toy faces, and the per-example
randomness."""
import importlib.util
import os
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

import celebgen as cg

SPLITS = {"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 0, "000004.jpg": 1, "000005.jpg": 1, "000006.jpg": 2}
LAYOUTS = {  # layout: (image folder, split file)
    "torchvision": ("celeba/img_align_celeba", "celeba/list_eval_partition.txt"),
    "official": ("img_align_celeba", "list_eval_partition.txt"),
    "kaggle": ("img_align_celeba/img_align_celeba", "list_eval_partition.csv"),
    "official, Kaggle's split file": ("img_align_celeba", "list_eval_partition.csv"),
}


def aligned_face(path):
    """A 178x218 'aligned CelebA image': red inside the standard crop box, blue outside."""
    img = Image.new("RGB", (178, 218), (0, 0, 255))
    ImageDraw.Draw(img).rectangle([cg.CELEBA_CROP[0], cg.CELEBA_CROP[1], cg.CELEBA_CROP[2] - 1, cg.CELEBA_CROP[3] - 1],
                                  (255, 0, 0))
    img.save(path, quality=95, subsampling=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_celeba_layouts_splits_and_crop(tmp_path, layout):
    folder, split_file = (tmp_path / p for p in LAYOUTS[layout])
    folder.mkdir(parents=True)
    for name in SPLITS:
        aligned_face(folder / name)
    if split_file.suffix == ".csv":
        split_file.write_text("image_id,partition\n" + "".join(f"{n},{s}\n" for n, s in SPLITS.items()))
    else:
        split_file.write_text("".join(f"{n} {s}\r\n" for n, s in SPLITS.items()))  # the official file is CRLF
    sizes = {split: len(cg.CelebA(tmp_path, split, 16)) for split in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 2, "test": 1}
    assert len(list(cg.CelebA(tmp_path, "train", 16))) == 3  # iteration ends at len()
    image = cg.CelebA(tmp_path, "val", 16)[1]
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    assert (image - red).abs().max() < 0.25  # the crop kept just the box: a blue pixel would be off by 2
    split_file.write_bytes(b"\xef\xbb\xbf" + split_file.read_bytes())  # a BOM before 000001.jpg
    assert len(cg.CelebA(tmp_path, "train", 16)) == 3
    split_file.write_bytes(split_file.read_bytes() + b"\xff")
    with pytest.raises(cg.UserError, match=f"{split_file.name} is not text .*; is it CelebA's split file"):
        cg.CelebA(tmp_path, "train", 16)


@pytest.mark.parametrize("split_file", [None, "list_eval_partition.txt"])
def test_training_on_a_folder_without_a_split_file_says_so(workdir, capsys, split_file):
    from test_training import cli
    (workdir / "data" / "img_align_celeba").mkdir(parents=True)
    for name in SPLITS:
        Image.new("RGB", (20, 20), (200, 100, 0)).save(workdir / "data" / "img_align_celeba" / name)
    if split_file:
        (workdir / "data" / split_file).write_text("".join(f"{n} {s}\n" for n, s in SPLITS.items()))
    code, out, _ = cli(capsys, "train", "--exp_name", "plain", "--data_root", "data", "--image_size", 16,
                       "--batch_size", 2, "--max_steps", 1, "--workers", 0, "--val_size", 2)
    note = "note: no split file: training and validation both use all 6 images (for CelebA's split, put"
    assert code == 0 and (note in out) == (split_file is None)


def test_plain_folder_uses_every_image_with_a_centre_crop(tmp_path):
    for i in range(3):
        img = Image.new("RGB", (40, 20), (0, 255, 0))
        ImageDraw.Draw(img).rectangle([10, 0, 29, 19], (255, 255, 255))  # the centred 20x20 square is white
        img.save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = cg.CelebA(tmp_path, "val", 8)
    assert len(data) == 3 and len(cg.CelebA(tmp_path, "train", 8)) == 3
    assert torch.equal(data[0], torch.ones(3, 8, 8))


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, capsys):
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = cg.CelebA(tmp_path, "train", 16)
    assert torch.equal(data[1], data[2])  # the unreadable image is replaced by the next one
    data[1]
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and "1.png" in err  # reported once


def test_an_image_too_large_to_decode_safely_is_skipped_with_a_warning(tmp_path, capsys,
                                                                        monkeypatch):
    for i in range(3):
        Image.new("RGB", (16 + 32 * (i == 1), 16), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)  # 48x16 is over twice that; 16x16 within it
    data = cg.CelebA(tmp_path, "train", 16)
    assert torch.equal(data[1], data[2])
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and "1.png" in err


def image_folder(folder, n, size=(20, 24)):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def cached(root, size):
    """The training split of the folder root at size x size, read from its image cache, built now."""
    data = cg.CelebA(root, "train", size, cache=True)
    cg.build_cache(data)
    return data


def test_image_cache_holds_the_decoded_images_and_follows_changes(tmp_path, monkeypatch, capsys):
    """The cached dataset gives the very tensors of the files (an unreadable image replaced by the
    next), read from the cache once built, in one pass of stats over the files; the next run reuses
    it without decoding; another size, an added image or a rewritten one builds a new cache."""
    monkeypatch.setattr(cg, "IMAGE_CACHE", tmp_path / "cache")
    image_folder(tmp_path / "data", 5)
    (tmp_path / "data" / "2.png").write_bytes(b"not a png")
    assert cg.CelebA(tmp_path / "data", "train", 8, cache=True).cache is None  # none built yet
    stats, cache_path = [], cg.image_cache_path  # each call stats every file: building makes one
    monkeypatch.setattr(cg, "image_cache_path", lambda *a: stats.append(a) or cache_path(*a))
    built = cg.CelebA(tmp_path / "data", "train", 8)
    cg.build_cache(built)
    assert len(stats) == 1
    out, err = capsys.readouterr()
    assert "decoding 5 images once" in out and "other cache" not in out and err.count("skipping unreadable image") == 1 and "2.png" in err
    assert built.cache.stat().st_size == 5 * 3 * 8 * 8
    plain = [cg.CelebA(tmp_path / "data", "train", 8)[i] for i in range(5)]
    assert all(torch.equal(built[i], plain[i]) for i in range(5)) and torch.equal(built[2], built[3])
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(cg, "load_pixels", lambda *args: pytest.fail("decoded an image, not read from the cache"))
        again = cg.CelebA(tmp_path / "data", "train", 8, cache=True)
        assert all(torch.equal(again[i], plain[i]) for i in range(5))
    out, err = capsys.readouterr()
    assert again.cache == built.cache and "decoding" not in out and "2.png" in err  # reported again
    assert cached(tmp_path / "data", 16).cache != built.cache
    assert "cache also holds 1 other cache (0.00 GB) of other image sizes or files" in capsys.readouterr()[0]
    Image.new("RGB", (20, 24), (0, 255, 0)).save(tmp_path / "data" / "0.png")  # rewritten
    rewritten = cached(tmp_path / "data", 8)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    assert rewritten.cache != built.cache and torch.equal(rewritten[0], green)
    Image.new("RGB", (20, 24)).save(tmp_path / "data" / "5.png")  # added
    assert cached(tmp_path / "data", 8).cache.name.startswith("6x8px-")
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 4
    assert "also holds 3 other caches" in capsys.readouterr()[0]
    (tmp_path / "cache" / "6x8px-0123.u8.999999.partial").write_bytes(b"a build killed midway")
    (tmp_path / "data" / "5.png").unlink()
    Image.new("RGB", (20, 24)).save(tmp_path / "data" / "6.png")
    cached(tmp_path / "data", 8)
    assert "also holds 4 other caches (0.00 GB) of other image sizes or files, and 1 unfinished (.partial)" in \
        capsys.readouterr()[0]


def test_a_broken_link_is_skipped_and_a_file_made_readable_builds_a_new_cache(tmp_path, monkeypatch, capsys):
    """A link to no file among the images is skipped as unreadable, the cache built; once the link is
    mended, or an unreadable file made readable (chmod: size and time unchanged), a new cache is built
    that holds the image."""
    monkeypatch.setattr(cg, "IMAGE_CACHE", tmp_path / "cache")
    image_folder(tmp_path / "data", 3)
    (tmp_path / "data" / "3.png").symlink_to(tmp_path / "elsewhere.png")
    broken = cached(tmp_path / "data", 8)
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and "3.png" in err and torch.equal(broken[3], broken[0])
    Image.new("RGB", (20, 24), (0, 255, 0)).save(tmp_path / "elsewhere.png")
    mended = cached(tmp_path / "data", 8)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    assert mended.cache != broken.cache and torch.equal(mended[3], green)
    access = os.access
    monkeypatch.setattr(cg.os, "access", lambda path, mode: access(path, mode) and Path(path).name != "1.png")
    assert cg.image_cache_path(mended.files, 8) != mended.cache


def test_an_interrupted_or_failed_cache_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the cache is built, or an error writing it, leaves no cache file; after the error
    the images are read from their files; a new run builds the cache whole, and builds it again if the
    file is cut short later."""
    monkeypatch.setattr(cg, "IMAGE_CACHE", tmp_path / "cache")
    image_folder(tmp_path / "data", 4)
    load_pixels, calls = cg.load_pixels, []

    def ctrl_c_at_the_third(path, size):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return load_pixels(path, size)
    with monkeypatch.context() as patch:
        patch.setattr(cg, "load_pixels", ctrl_c_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            cached(tmp_path / "data", 8)
    assert list((tmp_path / "cache").iterdir()) == []

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(cg.os, "replace", disk_full)
        failed = cached(tmp_path / "data", 8)
    assert failed.cache is None and "cannot write the image cache" in capsys.readouterr().err
    assert not list((tmp_path / "cache").glob("*.u8")) and not list((tmp_path / "cache").glob("*.partial"))
    plain = cg.CelebA(tmp_path / "data", "train", 8)
    assert all(torch.equal(failed[i], plain[i]) for i in range(4))
    whole = cached(tmp_path / "data", 8)
    assert whole.cache.is_file() and all(torch.equal(whole[i], plain[i]) for i in range(4))
    whole.cache.write_bytes(whole.cache.read_bytes()[:-1])  # cut short outside celebgen: built anew
    assert cg.CelebA(tmp_path / "data", "train", 8, cache=True).cache is None
    again = cached(tmp_path / "data", 8)
    assert again.cache == whole.cache and all(torch.equal(again[i], plain[i]) for i in range(4))


def test_a_cached_dataset_travels_to_a_spawned_worker_without_its_pixels(tmp_path, monkeypatch):
    """DataLoader workers started by spawn (macOS) receive the dataset pickled: the memory map must not
    be pickled as a copy of every image."""
    monkeypatch.setattr(cg, "IMAGE_CACHE", tmp_path / "cache")
    image_folder(tmp_path / "data", 8)
    data = cached(tmp_path / "data", 64)
    first = data[0]  # maps the cache in this process
    packed = pickle.dumps(data)
    assert len(packed) < 8 * 3 * 64 * 64 / 4 and torch.equal(pickle.loads(packed)[0], first)


@pytest.mark.parametrize("make,message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no images"),
    (lambda root: (root / "img_align_celeba").mkdir(parents=True), "no images"),
])
def test_missing_data_explains_the_layouts(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(cg.UserError, match=message) as e:
        cg.CelebA(root, "train", 16)
    assert "Kaggle" in str(e.value) and "--dataset toy" in str(e.value)


def test_split_file_that_names_other_images_is_an_error(tmp_path):
    (tmp_path / "img_align_celeba").mkdir()
    aligned_face(tmp_path / "img_align_celeba" / "000001.jpg")
    (tmp_path / "list_eval_partition.txt").write_text("999999.jpg 0\n")
    with pytest.raises(cg.UserError, match="no train images"):
        cg.CelebA(tmp_path, "train", 16)


@pytest.fixture
def google_drive(monkeypatch):
    """A stand-in for CelebA's Google Drive, as seen through torchvision's downloader, with gdown
    'installed': CelebA of 3 images; .fetched lists the files asked for, .images what the zip holds,
    .refusal an error to raise instead."""
    drive = SimpleNamespace(fetched=[], images=3, refusal=None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gdown" else find_spec(name, *a))
    monkeypatch.setattr(cg, "CELEBA_IMAGES", 3)
    names = [f"00000{i}.jpg" for i in range(1, 4)]

    def download(drive_id, root, filename, md5):
        if drive.refusal:
            raise drive.refusal
        drive.fetched.append(filename)
        Path(root).mkdir(parents=True, exist_ok=True)
        path = Path(root) / filename
        if filename == "img_align_celeba.zip":
            with zipfile.ZipFile(path, "w") as z:
                for name in names[:drive.images]:
                    aligned_face(Path(root) / name)
                    z.write(Path(root) / name, f"img_align_celeba/{name}")
                    (Path(root) / name).unlink()
        elif filename == "list_eval_partition.txt":
            path.write_text("".join(f"{n} {i % 3}\r\n" for i, n in enumerate(names)))
        else:
            path.write_text("3\n" + " ".join(cg.ATTRIBUTE_NAMES) + "\n" + "".join(f"{n}" + " 1" * 40 + "\n" for n in names))
    monkeypatch.setattr(torchvision.datasets.utils, "download_file_from_google_drive", download)
    return drive


def test_download_fetches_the_three_files_read_and_checks_them(tmp_path, google_drive):
    data = cg.CelebA(tmp_path, "train", 16, attributes=["Smiling"], download=True)
    assert google_drive.fetched == ["img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt"]
    assert len(data) == 1 and data[0].shape == (3, 16, 16) and data.label(0).tolist() == [1.0]
    cg.CelebA(tmp_path, "val", 16, download=True)  # there already: nothing fetched again
    assert len(google_drive.fetched) == 3


def test_an_incomplete_download_is_found(tmp_path, google_drive):
    google_drive.images = 2  # a zip that lost an image
    with pytest.raises(cg.UserError, match="img_align_celeba holds 2 images and list_eval_partition.txt 3 rows, not 3 "
                                           "of each.*delete .*img_align_celeba and run again"):
        cg.CelebA(tmp_path, "train", 16, download=True)
    assert google_drive.fetched == ["img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt"]


def test_download_keeps_celeba_in_another_layout(tmp_path, google_drive):
    """CelebA already under ROOT in the official layout: nothing is fetched, and it is checked."""
    (tmp_path / "img_align_celeba").mkdir()
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        aligned_face(tmp_path / "img_align_celeba" / name)
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n")
    assert len(cg.CelebA(tmp_path, "train", 16, download=True)) == 2 and google_drive.fetched == []
    (tmp_path / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(cg.UserError, match="holds 2 images .* not the whole of CelebA"):
        cg.CelebA(tmp_path, "train", 16, download=True)


@pytest.mark.parametrize("gdown", [False, True])
def test_a_download_that_cannot_work_says_what_to_fetch_by_hand(tmp_path, google_drive, monkeypatch, gdown):
    """Without gdown, or when Google Drive refuses (its quota), one error names the fix, the three files
    and where they go."""
    google_drive.refusal = RuntimeError("Too many users have viewed or downloaded this file recently")
    if not gdown:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(cg.UserError) as e:
        cg.CelebA(tmp_path, "train", 16, download=True)
    message = str(e.value)
    assert ("pip install gdown" in message) == (not gdown) and ("Too many users" in message) == gdown
    assert all(name in message for name in ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
                                            "ROOT/celeba/img_align_celeba", "Kaggle"))


def test_toy_faces_are_deterministic_and_varied():
    a, b = cg.ToyFaces(32), cg.ToyFaces(32)
    assert len(list(cg.ToyFaces(8, length=5))) == 5
    assert torch.equal(a[7], b[7])
    assert (a[7] - a[8]).abs().mean() > 0.1
    val = cg.ToyFaces(32, offset=10**6)
    assert (val[0] - a[0]).abs().mean() > 0.1
    images = torch.stack([a[i] for i in range(32)])
    assert images.min() >= -1 and images.max() <= 1 and images.std(dim=0).mean() > 0.2  # colours vary


def test_training_examples_are_a_function_of_seed_epoch_and_index():
    images = cg.ToyFaces(16)
    args = cg.argparse.Namespace(seed=3, t_mu=-0.8, t_sigma=0.8, attr_dropout=0.1, attr_dropout_all=0.1)
    ex = cg.FlowExamples(images, args)
    x1, x0, t, a = ex[5]
    again = cg.FlowExamples(images, args)[5]
    assert all(torch.equal(u, v) for u, v in zip((x1, x0, t, a), again)) and a.shape == (0,)
    assert torch.equal(x1, images[5]) or torch.equal(x1, images[5].flip(-1))
    ex.epoch = 1
    assert not torch.equal(ex[5][1], x0)  # a new epoch draws new noise
    flips = sum(not torch.equal(ex[i][0], images[i]) for i in range(64))
    assert 16 < flips < 48


# The split sizes of CelebA's official partition, and of RESULTS.md's 6,000-image subset of it
KNOWN_SPLITS = {202_599: (162_770, 19_867, 19_962), 6_000: (4_560, 780, 660)}


def test_real_celeba_in_its_layout(celeba_root):
    """Real CelebA images from $CELEBGEN_CELEBA (skipped without it): the splits of a split file are
    disjoint and, for CelebA and RESULTS.md's subset, of their known sizes; an image comes out at
    64x64, in [-1, 1], not blank."""
    _, split_file = cg.find_celeba(celeba_root)
    splits = [cg.celeba_files(celeba_root, split) for split in ("train", "val", "test")]
    if split_file is not None:
        sizes = tuple(map(len, splits))
        assert len(set().union(*splits)) == sum(sizes)  # no image in two splits
        assert sizes == KNOWN_SPLITS.get(sum(sizes), sizes)
    data = cg.CelebA(celeba_root, "val", 64)
    assert len(data) == len(splits[1])
    image = data[0]
    assert image.shape == (3, 64, 64) and image.std() > 0.1 and -1 <= image.min() <= image.max() <= 1


def test_toy_faces_have_three_disjoint_splits():
    """Toy train, val and test images are drawn from other seeds: validation and FID references are
    never training images."""
    splits = [cg.make_dataset(SimpleNamespace(dataset="toy", image_size=16, attributes=[]), name)
              for name in ("train", "val", "test")]
    for i in range(4):
        assert not any(torch.equal(splits[a][i], splits[b][i]) for a, b in ((0, 1), (0, 2), (1, 2)))
