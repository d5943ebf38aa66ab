"""Faces on request: attribute files in every layout, attribute dropout, classifier-free guidance, and
a conditional model that learns what it is asked for."""
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import celebgen as cg
from test_training import TOY, cli

NAMES = " ".join(cg.ATTRIBUTE_NAMES)


def official_rows(files, values):
    """'name v1 .. v40' rows of the official file, with its two-space alignment for 1 (' 1')."""
    return [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(files, values)]


def celeba_layout(root, layout, n=6, labelled=4, header_quirk=False):
    """A tiny CelebA in one of the layouts find_celeba knows: n 178x218 JPEGs, a split file (train, val,
    test in turn) and an attribute file with rows for the first `labelled` images only. Attribute k of
    image i is present when (i + k) is even. Returns the expected (n, 40) label matrix."""
    folder, split_file, attr_file = {
        "official": (root / "img_align_celeba", root / "list_eval_partition.txt", root / "list_attr_celeba.txt"),
        "torchvision": (root / "celeba" / "img_align_celeba", root / "celeba" / "list_eval_partition.txt",
                        root / "celeba" / "list_attr_celeba.txt"),
        "kaggle": (root / "img_align_celeba" / "img_align_celeba", root / "list_eval_partition.csv",
                   root / "list_attr_celeba.csv"),
    }[layout]
    folder.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / name)
    values = np.array([[1 if (i + k) % 2 == 0 else -1 for k in range(40)] for i in range(n)])
    if layout == "kaggle":
        split_file.write_text("image_id,partition\n" + "".join(f"{m},{i % 3}\n" for i, m in enumerate(names)))
        attr_file.write_text("image_id," + ",".join(cg.ATTRIBUTE_NAMES) + "\n" + "".join(
            f"{m}," + ",".join(map(str, row)) + "\n" for m, row in zip(names[:labelled], values)))
    else:
        split_file.write_text("".join(f"{m} {i % 3}\n" for i, m in enumerate(names)))
        lines = ([] if header_quirk else [str(labelled)]) + [NAMES + (" " if header_quirk else "")]
        lines += official_rows(names[:labelled], values)
        attr_file.write_text(("\r\n" if header_quirk else "\n").join(lines) + "\n")
    expected = torch.tensor(values, dtype=torch.float32)
    expected[labelled:] = 0  # no row: unspecified
    return expected


@pytest.mark.parametrize("layout,header_quirk", [("official", False), ("official", True), ("torchvision", False),
                                                 ("kaggle", False)])
def test_attribute_files_in_every_layout(tmp_path, layout, header_quirk):
    """Rows are read in every layout (a missing count line and CRLF endings too); the images without a row
    get 0 (unspecified) and are counted; the labels are in the order of --attributes' names."""
    expected = celeba_layout(tmp_path, layout, header_quirk=header_quirk)
    chosen = ["Smiling", "5_o_Clock_Shadow", "Young"]
    columns = [cg.ATTRIBUTE_NAMES.index(name) for name in chosen]
    for split, rows in (("train", [0, 3]), ("val", [1, 4]), ("test", [2, 5])):
        data = cg.CelebA(tmp_path, split, 8, attributes=chosen)
        assert torch.equal(torch.stack([data.label(i) for i in range(len(data))]), expected[rows][:, columns])
        assert data.unlabelled == sum(r >= 4 for r in rows)
    assert cg.CelebA(tmp_path, "train", 8).label(0).shape == (0,)  # no --attributes: nothing is read


def test_without_a_split_file_the_attribute_file_is_read_in_the_image_folder_or_the_root(tmp_path):
    """No split file: the official layout's attribute file (beside the image folder, in --data_root)
    and a plain folder's (among its images) are read; every image is in every split."""
    expected = celeba_layout(tmp_path / "official", "official")
    (tmp_path / "official" / "list_eval_partition.txt").unlink()
    plain = tmp_path / "official" / "img_align_celeba"
    columns = [cg.ATTRIBUTE_NAMES.index("Smiling"), cg.ATTRIBUTE_NAMES.index("Young")]
    labels = lambda data: torch.stack([data.label(i) for i in range(len(data))])
    assert torch.equal(labels(cg.CelebA(tmp_path / "official", "val", 8, ["Smiling", "Young"])),
                       expected[:, columns])
    (tmp_path / "official" / "list_attr_celeba.txt").replace(plain / "list_attr_celeba.txt")
    assert torch.equal(labels(cg.CelebA(plain, "val", 8, ["Smiling", "Young"])), expected[:, columns])


def test_an_unreadable_image_is_replaced_with_its_label(tmp_path, capsys):
    expected = celeba_layout(tmp_path, "official")
    (tmp_path / "img_align_celeba" / "000001.jpg").write_bytes(b"not a jpeg")
    data = cg.CelebA(tmp_path, "train", 8, attributes=["Smiling", "Young"])  # train: rows 0 and 3
    columns = [cg.ATTRIBUTE_NAMES.index("Smiling"), cg.ATTRIBUTE_NAMES.index("Young")]
    assert torch.equal(data.label(0), expected[0, columns])  # not known to be unreadable yet
    assert torch.equal(data[0], data[1]) and torch.equal(data.label(0), expected[3, columns])
    assert "skipping unreadable image" in capsys.readouterr().err


def test_bad_attribute_files_are_one_clear_error(tmp_path):
    celeba_layout(tmp_path, "official")
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0]]) + "\n")  # a row one value short
    with pytest.raises(cg.UserError, match=r"list_attr_celeba.txt line 4 is not 'image name' and 40 values"):
        cg.CelebA(tmp_path, "train", 8, attributes=["Smiling"])
    path.write_text("\n".join(lines[:2] + [lines[2].replace(" 1", " 2", 1)]) + "\n")
    with pytest.raises(cg.UserError, match="line 3 is not"):
        cg.CelebA(tmp_path, "train", 8, attributes=["Smiling"])
    path.write_text("just some text\n")
    with pytest.raises(cg.UserError, match="has no line of attribute names"):
        cg.CelebA(tmp_path, "train", 8, attributes=["Smiling"])
    path.write_bytes(b"\xff\xfe binary, not text\n")
    with pytest.raises(cg.UserError, match="list_attr_celeba.txt is not text .*; is it CelebA's attribute file"):
        cg.CelebA(tmp_path, "train", 8, attributes=["Smiling"])
    path.write_text("\ufeff1\nSmiling Young\n000001.jpg 1 0\n")  # a BOM, some columns, 0/1 for -1/1
    assert cg.CelebA(tmp_path, "train", 8, attributes=["Young"]).label(0).tolist() == [-1.0]
    with pytest.raises(cg.UserError, match="has no column Male; it has Smiling, Young"):
        cg.CelebA(tmp_path, "train", 8, attributes=["Male", "Young"])
    path.unlink()
    with pytest.raises(cg.UserError, match="--attributes needs CelebA's labels.*next to"):
        cg.CelebA(tmp_path, "train", 8, attributes=["Smiling"])


def test_toy_labels_are_what_is_drawn():
    """Toy labels are exact: blond hair is bright yellow above the face, and the rates are the documented
    ones (30% blond, 30% glasses, 65% smiling, 25% hats)."""
    faces = cg.ToyFaces(16, attributes=list(cg.TOY_ATTRIBUTES))
    labels = torch.stack([faces.label(i) for i in range(2000)])
    rates = (labels > 0).float().mean(0)
    assert torch.allclose(rates, torch.tensor([0.3, 0.3, 0.65, 0.25]), atol=0.03), rates
    blond = labels[:200, 0] > 0
    band = torch.stack([hair_yellowness(faces[i][None]) for i in range(200)]).squeeze(1)
    assert band[blond].mean() - band[~blond].mean() > 0.12, (band[blond].mean(), band[~blond].mean())


def hair_yellowness(images):
    """(B, 3, H, W) in [-1, 1] -> (B,): (R + G)/2 - B in [0, 1] units, averaged over the band above a toy
    face's forehead (rows 12.5-25% of the height, columns 30-70%), where its hair usually is (or a hat, or
    the background). Blond hair is about +0.38, dark hair and random colours 0 on average."""
    x = (images.float() + 1) / 2
    H, W = x.shape[-2:]
    band = x[:, :, int(0.125 * H):int(0.25 * H), int(0.3 * W):int(0.7 * W)]
    return ((band[:, 0] + band[:, 1]) / 2 - band[:, 2]).mean((1, 2))


def test_attribute_dropout_rates_are_the_flags():
    """Over many draws an attribute is hidden with probability p_all + (1 - p_all) p_each and the whole
    vector with probability p_all + (1 - p_all) p_each^K; what is kept is unchanged."""
    rng = np.random.default_rng(0)
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    p_each, p_all, n = 0.2, 0.15, 40_000
    draws = torch.stack([cg.drop_attributes(a, p_each, p_all, rng) for _ in range(n)])
    hidden = draws == 0
    assert torch.all((draws == a) | hidden)
    expected = p_all + (1 - p_all) * p_each
    assert torch.allclose(hidden.float().mean(0), torch.full((4,), expected), atol=0.01)
    assert hidden.all(1).float().mean().item() == pytest.approx(p_all + (1 - p_all) * p_each**4, abs=0.006)
    assert not (cg.drop_attributes(a, 0.0, 0.0, rng) == 0).any()


def test_training_examples_carry_their_image_labels_with_the_flagged_dropout():
    """FlowExamples pairs image i with label(i), hidden at the rates of --attr_dropout(_all)."""
    faces = cg.ToyFaces(8, attributes=list(cg.TOY_ATTRIBUTES))
    args = cg.argparse.Namespace(seed=0, t_mu=-0.8, t_sigma=0.8, attr_dropout=0.3, attr_dropout_all=0.2)
    examples = cg.FlowExamples(faces, args)
    a = torch.stack([examples[i][3] for i in range(3000)])
    labels = torch.stack([faces.label(i) for i in range(3000)])
    assert torch.all((a == labels) | (a == 0))
    assert (a == 0).float().mean().item() == pytest.approx(0.2 + 0.8 * 0.3, abs=0.015)
    # that rate is symmetric in the two; all hidden at once tells them apart (0.22, swapped 0.30)
    k = len(cg.TOY_ATTRIBUTES)
    assert (a == 0).all(1).float().mean().item() == pytest.approx(0.2 + 0.8 * 0.3**k, abs=0.02)


def conditional_dit(seed=0):
    torch.manual_seed(seed)
    model = cg.DiT(16, 4, dim=64, depth=2, heads=2, num_attributes=3)
    for p in model.parameters():  # an untrained model whose output depends on everything
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_no_attributes_is_the_unconditional_model_and_attributes_change_the_output():
    model = conditional_dit()
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4)
    assert torch.equal(model(x, t, torch.zeros(4, 3)), model(x, t))
    assert not torch.allclose(model(x, t, torch.tensor([[1.0, 0, 0]] * 4)), model(x, t))


def test_guidance_on_the_velocity_equals_guidance_on_the_prediction():
    """v_u + w (v_c - v_u) == velocity(x_u + w (x_c - x_u)): the affine identity of section 7."""
    model = conditional_dit()
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4) * 0.9
    a = torch.tensor([[1.0, -1, 0], [0, 1, 1], [-1, -1, -1], [1, 0, 0]])
    v_c = cg.velocity(model(x, t, a), x, t, 0.0)
    v_u = cg.velocity(model(x, t, torch.zeros_like(a)), x, t, 0.0)
    for w in (0.5, 2.0, 4.0):
        guided = cg.velocity(cg.guided_prediction(model, x, t, a, w), x, t, 0.0)
        assert torch.allclose(guided, v_u + w * (v_c - v_u), atol=1e-4)
        assert (guided - v_c).abs().max() > 1e-3  # and guidance does change the velocity


def test_cfg_scale_1_is_conditional_and_0_unconditional_exactly():
    model = conditional_dit()
    noise, a = torch.randn(2, 3, 16, 16), torch.tensor([[1.0, -1, 0], [0, 1, 1]])
    conditional = cg.sample(lambda x, t: model(x, t, a), noise, cg.time_grid(4))
    unconditional = cg.sample(lambda x, t: model(x, t), noise, cg.time_grid(4))
    assert torch.equal(cg.sample(model, noise, cg.time_grid(4), attributes=a, cfg_scale=1.0), conditional)
    assert torch.equal(cg.sample(model, noise, cg.time_grid(4), attributes=a, cfg_scale=0.0), unconditional)
    assert not torch.allclose(conditional, unconditional)


@pytest.mark.parametrize("argv,message", [
    (["--attributes", "Smilling"], "unknown attribute 'Smilling' (did you mean Smiling?); CelebA's attributes"
                                   " are 5_o_Clock_Shadow,"),
    (["--attributes", "Male"], "toy faces have no Male; their attributes are Blond_Hair,Eyeglasses,Smiling,"),
    (["--attr_dropout", "1"], "argument --attr_dropout: must be < 1, got 1"),
    (["--attr_dropout_all", "nan"], "argument --attr_dropout_all: must be a finite number"),
    (["--attributes", "Smiling", "--dataset", "celeba", "--data_root", "plain"],
     "--attributes needs CelebA's labels, list_attr_celeba.txt or list_attr_celeba.csv, in plain; there is none"),
])
def test_bad_train_attributes_are_one_line_and_write_nothing(workdir, capsys, argv, message):
    (workdir / "plain").mkdir()
    Image.new("RGB", (16, 16)).save(workdir / "plain" / "a.png")
    code, out, err = cli(capsys, "train", "--exp_name", "bad", *TOY, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err and err.startswith("error: "), err
    assert not (workdir / "experiments").exists()


@pytest.fixture
def conditional(workdir, capsys):
    """A 2-step experiment 'cond' conditioned on two toy attributes."""
    code, _, err = cli(capsys, "train", "--exp_name", "cond", *TOY, "--attributes", "Smiling,Blond_Hair",
                       "--batch_size", 4, "--max_steps", 2)
    assert code == 0, err
    return workdir / "experiments" / "cond"


@pytest.mark.parametrize("argv,message", [
    (["--attributes", "Eyeglasses=1"], "this checkpoint was not trained on Eyeglasses; it knows Blond_Hair,Smiling"),
    (["--attributes", "Smiling=2"], "'Smiling=2': write NAME=1 (present) or NAME=0 (absent)"),
    (["--attributes", "Smiling"], "'Smiling': write NAME=1"),
    (["--attributes", "Smiling=1,Smiling=0"], "'Smiling=1,Smiling=0' names Smiling twice"),
    (["--attributes", "Smiling=1", "Blond_Hair=0"], "several --attributes settings or --cfg_scale values make "
                                                    "a grid: add --grid, or join them with commas for one "
                                                    "request: Smiling=1,Blond_Hair=0"),
    (["--attributes", "Smiling=1", "Smiling=0"], "several --attributes settings or --cfg_scale values make a "
                                                 "grid: add --grid\n"),
    (["--attributes", "Smiling=1", "none"], "make a grid: add --grid\n"),
    (["--attributes", "Smiling=1", "--cfg_scale", "1", "2"], "values make a grid: add --grid\n"),
    (["--cfg_scale", "-1"], "argument --cfg_scale: must be >= 0, got -1"),
    (["--grid", "--attributes", "Smiling=1"], "--grid draws --grid_samples samples per cell, not --num_samples; "
                                              "drop --num_samples"),
    (["--grid_samples", "2"], "--grid_samples counts the samples per cell of --grid; add --grid"),
    (["--grid", "--grid_samples", "65"], "argument --grid_samples: must be < 65, got 65"),
])
def test_bad_sample_attributes_are_one_line(conditional, capsys, argv, message):
    code, out, err = cli(capsys, "sample", "--exp_name", "cond", "--num_samples", 2, "--num_sampling_steps", 1,
                         *argv)
    assert code == 2 and err.count("\n") == 1 and message in err and err.startswith("error: "), err
    assert not list((conditional / "samples").glob("last_*"))


def test_sample_writes_requests_and_a_guidance_grid(conditional, capsys):
    code, out, err = cli(capsys, "sample", "--exp_name", "cond", "--num_samples", 3, "--num_sampling_steps", 2,
                         "--attributes", "Smiling=1", "--cfg_scale", 2)
    assert code == 0, err
    assert len(list((conditional / "samples" / "last_euler2_seed0_Smiling=1_cfg2").glob("*.png"))) == 3
    # without --cfg_scale a request is guided at GUIDANCE, and no request is plainly conditional (1)
    code, out, err = cli(capsys, "sample", "--exp_name", "cond", "--num_samples", 1, "--num_sampling_steps", 2,
                         "--attributes", "Blond_Hair=0")
    assert code == 0 and cg.GUIDANCE != 1, err
    assert (conditional / "samples" / f"last_euler2_seed0_Blond_Hair=0_cfg{cg.GUIDANCE:g}").is_dir()
    code, out, err = cli(capsys, "sample", "--exp_name", "cond", "--num_samples", 1, "--num_sampling_steps", 2)
    assert code == 0 and (conditional / "samples" / "last_euler2_seed0").is_dir(), err
    # nor autoguided by default, guide.pt or not (it costs agreement with the request: RESULTS.md)
    assert cli(capsys, "sample", "--exp_name", "cond", "--num_samples", 1, "--num_sampling_steps", 2,
               "--autoguidance", 1)[0] == 0 and (conditional / "checkpoints" / "guide.pt").is_file()
    assert np.array_equal(*(np.asarray(Image.open(conditional / "samples" / name / "000000.png"))
                            for name in ("last_euler2_seed0", "last_euler2_autoguidance1_seed0")))
    code, out, err = cli(capsys, "sample", "--exp_name", "cond", "--num_sampling_steps", 2, "--grid",
                         "--attributes", "Smiling=1", "Smiling=0,Blond_Hair=1", "none", "--cfg_scale", 0, 1, 3,
                         "--grid_samples", 2)
    assert code == 0, err
    grid_name = "last_grid2_euler2_seed0_Smiling=1+Smiling=0,Blond_Hair=1+none_cfg0,1,3.png"
    with Image.open(conditional / "samples" / grid_name) as grid:
        # 3 rows x 3 columns of cells, each 2 samples of 16 pixels side by side with 2-pixel gaps, 8 apart
        assert grid.size == (8 + 3 * (2 + 2 * 18 + 8), 8 + 3 * (2 + 18 + 8))
    assert list((conditional / "logs").glob("events.*"))
    assert "rows Smiling=1 | Smiling=0,Blond_Hair=1 | none; columns cfg_scale 0, 1, 3" in out


def recorded_sampling(monkeypatch):
    """Every call of cg.sample, as {parameter: value}; each call still samples."""
    calls, real = [], cg.sample

    def recording(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return real(*args, **kwargs)
    monkeypatch.setattr(cg, "sample", recording)
    return calls


def test_sample_and_its_grid_sample_as_their_flags_ask(conditional, capsys, monkeypatch):
    """`sample` and `sample --grid` hand the sampler the requests, weights, method and time grid their
    flags ask for, the noise of --seed, and the model autoguided by its guide.pt at the --autoguidance
    asked for."""
    calls = recorded_sampling(monkeypatch)
    flags = ["--exp_name", "cond", "--num_sampling_steps", 3, "--method", "heun", "--time_power", 1.5,
             "--autoguidance", 1.5, "--seed", 3]
    code, _, err = cli(capsys, "sample", *flags, "--attributes", "Smiling=1", "--cfg_scale", 2.5,
                       "--num_samples", 2)
    assert code == 0, err
    code, _, err = cli(capsys, "sample", *flags, "--grid", "--attributes", "Smiling=0", "Blond_Hair=1",
                       "--cfg_scale", 0, 3, "--grid_samples", 2)
    assert code == 0, err
    smiling = cg.load_checkpoint(conditional / "checkpoints/last.pt")["args"]["attributes"].index("Smiling")
    request = lambda name, value: [[value if (name == "Smiling") == (k == smiling) else 0.0 for k in range(2)]] * 2
    assert [(call["cfg_scale"], call["attributes"].tolist()) for call in calls] == [
        (2.5, request("Smiling", 1.0)), (0, request("Smiling", -1.0)), (3, request("Smiling", -1.0)),
        (0, request("Blond_Hair", 1.0)), (3, request("Blond_Hair", 1.0))]
    for call in calls:
        assert call["method"] == "heun" and call["times"] == cg.time_grid(3, 1.5)
        assert isinstance(call["model"], cg.Autoguided) and call["model"].weight == 1.5
        seeded = torch.Generator().manual_seed(3)  # two images each: one batch, the seed's first noise
        assert torch.equal(call["noise"], torch.randn(call["noise"].shape, generator=seeded))


def test_a_grid_of_many_requests_is_named_by_their_digest(conditional, capsys):
    settings = [f"Smiling={a},Blond_Hair={b}" for a in (0, 1) for b in (0, 1)] + ["Smiling=1", "Blond_Hair=1"]
    code, out, err = cli(capsys, "sample", "--exp_name", "cond", "--num_sampling_steps", 1, "--grid",
                         "--grid_samples", 1, "--attributes", *settings, "--cfg_scale", 0, 1, 2, 3)
    assert code == 0, err
    [grid] = (conditional / "samples").glob("last_grid1_euler1_seed0_requests*.png")
    assert len(grid.name) == len("last_grid1_euler1_seed0_requests") + 10 + len(".png")


def test_unconditional_and_old_checkpoints_refuse_requests_and_still_sample(trained_unconditional, capsys):
    """A checkpoint written before conditioning existed (no 'attributes' in its arguments) samples as
    before, and asking it for attributes or guidance is one line."""
    state = torch.load(trained_unconditional, weights_only=True)
    del state["args"]["attributes"]
    torch.save(state, trained_unconditional)
    code, out, err = cli(capsys, "sample", "--exp_name", "done", "--num_samples", 2, "--num_sampling_steps", 1)
    assert code == 0, err
    code, out, err = cli(capsys, "sample", "--exp_name", "done", "--grid", "--num_sampling_steps", 1)
    assert code == 0 and "rows none; columns cfg_scale 1" in out, err  # one row of unconditional samples
    for argv in (["--attributes", "Smiling=1"], ["--cfg_scale", 2]):
        code, out, err = cli(capsys, "sample", "--exp_name", "done", "--num_samples", 2, *argv)
        assert code == 2 and "trained without --attributes: it draws random faces" in err, err


@pytest.fixture
def trained_unconditional(workdir, capsys):
    assert cli(capsys, "train", "--exp_name", "done", *TOY, "--batch_size", 4, "--max_steps", 2)[0] == 0
    return workdir / "experiments" / "done" / "checkpoints" / "last.pt"


def test_a_conditional_model_learns_what_it_is_asked_for(workdir, capsys, monkeypatch):
    """A short run on toy faces conditioned on all four toy attributes, of a model smaller than tiny
    (width 96, depth 4: under half of tiny's time per step). Asked for Blond_Hair=1 and =0 (the others
    unspecified) from the same noise, its samples' hair band differs in yellowness, and at guidance
    weight 3 more than twice as much as at 1."""
    monkeypatch.setitem(cg.MODELS, "micro", dict(dim=96, depth=4, heads=3))
    code, out, err = cli(capsys, "train", "--exp_name", "learn", "--dataset", "toy", "--model", "micro",
                         "--image_size", 16, "--workers", 0, "--precision", "fp32", "--attributes", "all",
                         "--lr", "2e-3", "--warmup_steps", 50, "--max_steps", 600, "--batch_size", 32,
                         "--ema_decay", 0.99, "--eval_every", 600, "--sample_every", 600, "--log_every", 100)
    assert code == 0, err
    ckpt = cg.load_checkpoint("experiments/learn/checkpoints/last.pt")
    model = cg.load_model(ckpt, torch.device("cpu"))
    noise = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blond = {}
    for cfg_scale in (1.0, 3.0):
        for value in (1.0, -1.0):
            asked = torch.tensor([[value, 0.0, 0.0, 0.0]]).expand(64, -1)
            images = cg.sample(model, noise, cg.time_grid(20), attributes=asked, cfg_scale=cfg_scale)
            blond[cfg_scale, value] = hair_yellowness(images).mean().item()
    gap1, gap3 = blond[1.0, 1.0] - blond[1.0, -1.0], blond[3.0, 1.0] - blond[3.0, -1.0]
    assert gap1 > 0.05 and gap3 > 2 * gap1, blond
