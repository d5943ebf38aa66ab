"""Rules of the training loop, each measured on something the test controls."""
import argparse
import itertools
import sys

import pytest
import torch

import celebgen as cg


def ema_lag(decay, steps):
    """Run update_ema against a weight that grows by 1 per step; return {step: how far the EMA lags}."""
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.zero_()
    lags = {}
    for step in range(max(steps) + 1):
        model.weight.data.fill_(step)
        cg.update_ema(ema, model, step, decay)
        lags[step] = step - ema.weight.item()
    return {step: lags[step] for step in steps}


def test_ema_spans_a_tenth_of_the_run_early_and_one_over_one_minus_decay_later():
    """update_ema's docstring: the lag is (step + 1) / 10 during the warm-up, d / (1 - d) after.
    A move by d instead of 1 - d, or no warm-up, changes both numbers."""
    for step, lag in ema_lag(0.9999, [10, 100, 1000]).items():
        assert lag == pytest.approx((step + 1) / 10, rel=1e-3)
    assert ema_lag(0.9, [1000])[1000] == pytest.approx(0.9 / 0.1, rel=1e-3)
    assert ema_lag(0.99, [3000])[3000] == pytest.approx(0.99 / 0.01, rel=1e-3)
    assert round(ema_lag(0.995, [6000])[6000]) == 199  # the default's "about 200 steps"


class Images(list):
    """A list of images as a dataset: the i-th image, and its label: attribute i % 2 present."""

    def label(self, i):
        return torch.tensor([1.0 if i % 2 else -1.0])


def test_validation_times_are_the_quantiles_of_the_training_times():
    """validation_set's docstring: t_k = the (k + 1/2)/n quantile of the training distribution, so the
    fraction of training draws below t_k is (k + 1/2)/n, n the images used (at most those there). Images
    and noise are fixed by the seed."""
    images = Images(torch.full((3, 4, 4), float(i)) for i in range(20))
    x1, x0, t, a = cg.validation_set(images, 16, seed=3, t_mu=-0.8, t_sigma=0.8)
    draws = cg.logit_normal(torch.randn(400_000, generator=torch.Generator().manual_seed(0)), -0.8, 0.8)
    below = (draws[:, None] < t[None, :]).double().mean(0)
    assert torch.allclose(below, (torch.arange(16) + 0.5).double() / 16, atol=0.003)
    t20 = cg.validation_set(images, 30, seed=3, t_mu=-0.8, t_sigma=0.8)[2]  # 30 asked, 20 there: n = 20
    below = (draws[:, None] < t20[None, :]).double().mean(0)
    assert torch.allclose(below, (torch.arange(20) + 0.5).double() / 20, atol=0.003)
    assert torch.equal(x1, torch.stack(images[:16])) and torch.equal(a[:, 0], torch.tensor([-1.0, 1.0] * 8))
    again = cg.validation_set(images, 16, seed=3, t_mu=-0.8, t_sigma=0.8)
    assert torch.equal(again[1], x0) and torch.equal(again[2], t)


@pytest.mark.parametrize("step,progress,expected", [
    (0, 0.0, 1e-3 / 100), (49, 0.0, 0.5e-3), (98, 0.0, 0.99e-3), (99, 0.0, 1e-3), (100, 0.0, 1e-3),
    (5000, 0.5, 1e-3), (5000, 0.8, 1e-3), (5000, 0.9, 0.5e-3), (5000, 0.99, 0.05e-3), (5000, 1.0, 0.0),
    (49, 0.9, 0.25e-3)])  # a warm-up that runs into the cooldown: both factors
def test_learning_rate_warms_up_stays_constant_then_cools_down_to_0(step, progress, expected):
    args = argparse.Namespace(lr=1e-3, warmup_steps=100, cooldown=0.2)
    assert cg.learning_rate(step, progress, args) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    args.cooldown = 0.0  # no cooldown: constant after the warm-up
    assert cg.learning_rate(step, progress, args) == pytest.approx(1e-3 * min(1, (step + 1) / 100), rel=1e-12)


def fake_training_clock(monkeypatch, seconds_per_reading):
    """The trainer's clock made exact: train_loop reads time.monotonic() once before its first step
    and once after each step; here each of its readings advances by seconds_per_reading, whatever
    the machine's load. Other callers get the real clock."""
    real, now = cg.time.monotonic, [0.0]

    def clock():
        if sys._getframe(1).f_code is not cg.train_loop.__code__:
            return real()
        now[0] += seconds_per_reading
        return now[0]
    monkeypatch.setattr(cg.time, "monotonic", clock)


def test_a_time_budget_ends_on_time_cooled_down_and_resumes_on_the_same_clock(workdir, capsys, monkeypatch):
    """--max_minutes 0.05 (3 s) at 0.125 s per step ends the run after the step that reaches 3 s of
    training, step 24, validated and saved; that step's learning rate is set from 2.875 s, 23 steps
    in: lr (1 - 2.875 / 3) / 0.2. A resume with the same budget has nothing to do, and one with 0.1
    minutes continues the same clock: 24 steps more, to 6.0 s, not 3 s more after a fresh start."""
    fake_training_clock(monkeypatch, 0.125)
    args = [*TOY, "--batch_size", 4, "--lr", 1e-3, "--warmup_steps", 2, "--log_every", 1000,
            "--eval_every", 1000, "--max_minutes", 0.05, "--max_steps", 60]  # the clock ends it first
    code, out, err = cli(capsys, "train", "--exp_name", "budget", *args)
    assert code == 0, err
    first = checkpoint("budget")
    assert first["step"] == 24 and first["elapsed"] == 3.0
    lr = first["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-3 * (1 - 2.875 / 3) / 0.2, rel=1e-6)
    assert "step 24 | val loss (EMA)" in out  # the end validates, samples and saves
    code, out, err = cli(capsys, "train", "--exp_name", "budget", "--resume")
    assert code == 0 and "budget has trained 0.05 of its 0.05 minutes" in out
    assert checkpoint("budget")["step"] == 24
    assert cli(capsys, "train", "--exp_name", "budget", "--resume", "--max_minutes", 0.1)[0] == 0
    again = checkpoint("budget")
    assert again["step"] == 48 and again["elapsed"] == 6.0


# ----- through the real trainer (toy data or a small folder of images, a few steps) -----

from test_data import LAYOUTS  # noqa: E402
from test_model import randomized  # noqa: E402
from test_training import (TOY, checkpoint, cli, labelled_celeba, logged_scalars, random_image_folder,  # noqa: E402
                           toy_initial_weights)


def test_the_optimizer_gets_the_warm_up_learning_rate_also_after_a_resume(workdir, capsys):
    """The lr in the saved optimizer state after step k is learning_rate(k - 1): lr * k / warmup (no cooldown
    yet: step k - 1 is at most 80% of the run)."""
    args = [*TOY, "--batch_size", 4, "--lr", 1e-3, "--warmup_steps", 10]
    assert cli(capsys, "train", "--exp_name", "lr", *args, "--max_steps", 3)[0] == 0
    assert checkpoint("lr")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-4, rel=1e-12)
    assert cli(capsys, "train", "--exp_name", "lr", "--resume", "--max_steps", 5)[0] == 0
    assert checkpoint("lr")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4, rel=1e-12)
    # step 10 of 10 (index 9) is at 90% of the run, halfway through the cooldown of its last 20%
    assert cli(capsys, "train", "--exp_name", "lr", "--resume", "--max_steps", 10)[0] == 0
    assert checkpoint("lr")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.5e-3, rel=1e-12)


def test_gradients_are_clipped_at_the_flag_and_the_log_shows_the_norm_before_clipping(workdir, capsys,
                                                                                    monkeypatch):
    """AdamW steps with a gradient of norm min(--grad_clip, the norm before clipping), and the log shows
    the norm before. So AdamW's first step moves each weight by about lr whatever the gradient's scale --
    unless the clipped gradient falls far below Adam's eps (1e-8): a clip of 1e-12 all but stops training."""
    stepped, adamw_step = [], torch.optim.AdamW.step

    def record_norm_then_step(self, *args, **kwargs):
        stepped.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]
                                  if p.grad is not None]).norm().item())
        return adamw_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", record_norm_then_step)
    moved, init = {}, toy_initial_weights()
    for clip in (0.01, 1e-12):
        name = f"clip{clip:g}"
        code, out, _ = cli(capsys, "train", "--exp_name", name, *TOY, "--batch_size", 4, "--max_steps", 1,
                           "--warmup_steps", 1, "--grad_clip", clip)
        assert code == 0
        logged = float(out.split("| grad ")[1].split()[0])
        assert logged > 0.02  # the norm before clipping, not the clipped one
        assert stepped.pop() == pytest.approx(clip, rel=1e-4)
        weights = checkpoint(name)["model"]
        moved[clip] = max((weights[k] - init[k]).abs().max().item() for k in init)
    assert moved[0.01] > 5e-4 and moved[1e-12] < 1e-5
    code, out, _ = cli(capsys, "train", "--exp_name", "unclipped", *TOY, "--batch_size", 4, "--max_steps", 1,
                       "--grad_clip", 1000)
    assert code == 0 and stepped.pop() == pytest.approx(float(out.split("| grad ")[1].split()[0]), abs=5e-4)


def test_the_first_step_is_plain_adamw_and_the_logs_show_the_ema(workdir, capsys):
    """AdamW's first step moves each weight by -lr g / (|g| + eps): by lr where the gradient is well
    above eps, and not at all where it is 0 (no weight decay) -- which at initialisation is
    every weight but the output layer's, whose zeros pass no gradient back. update_ema's warm-up
    d = 1/10 at step 0 then puts the EMA at 0.1 init + 0.9 model, and the validation loss and
    the sample grid after that step are the EMA's, not the raw weights'."""
    lr = 1e-2
    code, _, err = cli(capsys, "train", "--exp_name", "one", *TOY, "--batch_size", 4, "--max_steps", 1,
                       "--warmup_steps", 1, "--lr", lr, "--eval_every", 1, "--sample_every", 1)
    assert code == 0, err
    ckpt = checkpoint("one")
    init = toy_initial_weights()
    for k in init:
        moved = (ckpt["model"][k] - init[k]).abs()
        if k.startswith("out."):
            assert moved.max() < lr * (1 + 1e-5) and ((moved - lr).abs() < 1e-3 * lr).float().mean() > 0.95
        else:  # the zero output layer passes no gradient back: nothing else moves, not even by decay
            assert not moved.any(), k
        assert torch.allclose(ckpt["ema"][k], 0.1 * init[k] + 0.9 * ckpt["model"][k], atol=1e-7), k

    args = argparse.Namespace(**ckpt["args"])
    val = cg.validation_set(cg.make_dataset(args, "val"), args.val_size, args.seed, args.t_mu, args.t_sigma)
    cpu, weights = torch.device("cpu"), {}
    for part in ("ema", "model"):
        weights[part] = cg.load_model(ckpt, cpu, use_ema=part == "ema")
    logged = logged_scalars(workdir / "experiments/one/logs", "val/loss")[0].value
    losses = {part: cg.validation_loss(m, val, args.t_eps, 16, cpu, "fp32") for part, m in weights.items()}
    assert logged == pytest.approx(losses["ema"], rel=1e-5) and abs(losses["model"] - logged) > 1e-3 * logged

    noise = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(args.seed + 1))
    saved = cg.to_signed(cg.image_tensor(cg.Image.open(workdir / "experiments/one/samples/step_0000001.png")))
    drawn = {part: cg.image_grid(cg.sample(m, noise, cg.time_grid(args.num_sampling_steps))) * 2 - 1 for part, m in weights.items()}
    assert (drawn["ema"] - saved).abs().max() <= 1.01 / 127.5  # the same up to 8-bit rounding
    assert (drawn["model"] - saved).abs().max() > 3 / 127.5


def test_adams_second_moments_forget_old_gradients_within_tens_of_steps():
    """training_parts' comment: AdamW's beta2 0.95 averages squared gradients over ~20 steps. After 100
    steps of gradient 1 and 30 of gradient 100, its step is m / sqrt(v) = 1.08 lr (bias-corrected moments:
    0.96 * 100 / sqrt(0.79 * 10^4)); DiT's 0.999 still remembers the small gradients: 1.94 lr."""
    args = argparse.Namespace(seed=0, model="tiny", image_size=8, patch_size=4, attributes=[], lr=1e-3,
                              resolved_precision="fp32")
    parts = cg.training_parts(cg.build_model(args), torch.device("cpu"), args)
    weight = parts.model.out.bias
    for step in range(130):
        for p in parts.model.parameters():
            p.grad = torch.full_like(p, 1.0 if step < 100 else 100.0)
        before = weight.detach().clone()
        parts.optimizer.step()
    assert ((before - weight.detach()) / args.lr).tolist() == pytest.approx([1.08] * len(weight), abs=0.01)


def record_training_images(monkeypatch):
    """Which image indices the trainer's examples are read at, in order (--workers 0: in this process),
    and {index: the (noise, time) of each of its examples}."""
    seen, drawn, real_getitem = [], {}, cg.FlowExamples.__getitem__

    def getitem(self, i):
        x1, x0, t, a = real_getitem(self, i)
        seen.append(i)
        drawn.setdefault(i, []).append((x0, t))
        return x1, x0, t, a
    monkeypatch.setattr(cg.FlowExamples, "__getitem__", getitem)
    return seen, drawn


def test_every_epoch_is_a_new_permutation_of_all_images_and_a_resume_sees_the_same(workdir, capsys, monkeypatch):
    """Each epoch reads every image once, in a new order, and with new noise and a new time; a resume
    reads exactly what the uninterrupted run read; another --seed reads another order."""
    random_image_folder(workdir / "images", 12)
    args = [*TOY, "--dataset", "celeba", "--data_root", "images", "--batch_size", 4]
    seen, drawn = record_training_images(monkeypatch)
    assert cli(capsys, "train", "--exp_name", "straight", *args, "--max_steps", 9)[0] == 0
    straight = list(seen)
    epochs = [straight[0:12], straight[12:24], straight[24:36]]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)  # no repeats, no omissions
    assert epochs[0] != epochs[1] != epochs[2]
    for examples in drawn.values():  # 3 epochs: 3 different noises and times for each image
        assert len(examples) == 3 and len({t.item() for _, t in examples}) == 3
        assert not any(torch.equal(examples[i][0], examples[j][0]) for i, j in [(0, 1), (0, 2), (1, 2)])
    seen.clear()
    assert cli(capsys, "train", "--exp_name", "resumed", *args, "--max_steps", 5)[0] == 0
    assert cli(capsys, "train", "--exp_name", "resumed", "--resume", "--max_steps", 9)[0] == 0
    assert seen == straight  # the resume skipped exactly the 2 batches of epoch 2 already seen
    seen.clear()
    assert cli(capsys, "train", "--exp_name", "seed1", *args, "--max_steps", 3, "--seed", 1)[0] == 0
    assert sorted(seen) == list(range(12)) and seen != straight[:12]  # another seed, another order


def test_validation_is_the_same_number_after_a_resume(workdir, capsys):
    """The same fixed images, noise and times, so best.pt is chosen by a comparable number: the EMA's
    validation loss at step 4 is the same whether the run was resumed at step 2 or not."""
    args = [*TOY, "--batch_size", 4, "--eval_every", 2]
    val_line = lambda out: next(line for line in out.splitlines() if line.startswith("step 4 | val loss"))
    out = cli(capsys, "train", "--exp_name", "straight", *args, "--max_steps", 4)[1]
    assert cli(capsys, "train", "--exp_name", "resumed", *args, "--max_steps", 2)[0] == 0
    assert val_line(out) == val_line(cli(capsys, "train", "--exp_name", "resumed", "--resume", "--max_steps", 4)[1])


def test_best_val_survives_a_resume(workdir, capsys):
    """A resumed run compares its validation loss with the saved best, not with infinity: given a best
    no loss can beat, it writes no new best.pt."""
    args = [*TOY, "--batch_size", 4, "--eval_every", 1]
    assert cli(capsys, "train", "--exp_name", "best", *args, "--max_steps", 1)[0] == 0
    path = workdir / "experiments/best/checkpoints/last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["best_val"] = -1.0
    torch.save(ckpt, path)
    best_before = (workdir / "experiments/best/checkpoints/best.pt").read_bytes()
    code, out, _ = cli(capsys, "train", "--exp_name", "best", "--resume", "--max_steps", 2)
    assert code == 0 and "step 2 | val loss" in out and "new best" not in out
    assert (workdir / "experiments/best/checkpoints/best.pt").read_bytes() == best_before
    assert checkpoint("best")["best_val"] == -1.0


def test_a_resume_restores_the_ema_and_adams_moments_it_saved(workdir, capsys):
    assert cli(capsys, "train", "--exp_name", "resumed", *TOY, "--batch_size", 4, "--max_steps", 1)[0] == 0
    ckpt = checkpoint("resumed")
    model = cg.build_model(cg.argparse.Namespace(**ckpt["args"]))
    ema = cg.build_model(cg.argparse.Namespace(**ckpt["args"]))
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cg.restore(ckpt, model, ema, optimizer, scaler)
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in ema.state_dict().items())
    restored, saved = optimizer.state_dict()["state"], ckpt["optimizer"]["state"]
    assert all(torch.equal(restored[i]["exp_avg_sq"], saved[i]["exp_avg_sq"]) for i in saved)
    assert any(state["exp_avg_sq"].any() for state in restored.values())  # Adam's moments are back


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_celeba_crop_is_the_published_box(tmp_path, layout):
    """A 178x218 image whose red channel is the pixel's x and green its y, read at 128 px (crop, no
    resize) through the real loader: the result is exactly x 25..152, y 57..184 (the box 25..153 x
    57..185, right and bottom exclusive)."""
    folder, split_file = (tmp_path / p for p in LAYOUTS[layout])
    folder.mkdir(parents=True)
    x, y = torch.meshgrid(torch.arange(178), torch.arange(218), indexing="xy")  # (218, 178) each
    pixels = torch.stack([x, y, torch.zeros_like(x)], -1).to(torch.uint8).numpy()
    cg.Image.fromarray(pixels).save(folder / "000001.png")
    split_file.write_text("image_id,partition\n000001.png,0\n" if split_file.suffix == ".csv" else "000001.png 0\n")
    image = (cg.CelebA(tmp_path, "train", 128)[0] + 1) * 127.5                    # (3, 128, 128)
    assert torch.allclose(image[0], torch.arange(25, 153).float().expand(128, 128), atol=1e-3)
    assert torch.allclose(image[1], torch.arange(57, 185).float()[:, None].expand(128, 128), atol=1e-3)


def test_the_flip_is_horizontal():
    """Training examples are the image or its mirror image (left-right), never upside down."""
    images = Images(torch.arange(48.0).view(3, 4, 4) + i for i in range(40))
    args = cg.argparse.Namespace(seed=0, t_mu=-0.8, t_sigma=0.8, attr_dropout=0.1, attr_dropout_all=0.1)
    examples = cg.FlowExamples(images, args)
    flipped = 0
    for i in range(40):
        x1 = examples[i][0]
        assert torch.equal(x1, images[i]) or torch.equal(x1, images[i].flip(-1))
        flipped += not torch.equal(x1, images[i])
    assert 8 < flipped < 32


@pytest.mark.parametrize("threads, local_world, expected", [(1, 1, 1), (2, 1, 2), (2, 2, 1), (1, 2, 1)])
def test_cpu_processes_split_the_threads_pytorch_was_given(monkeypatch, threads, local_world, expected):
    """A CPU process keeps PyTorch's thread count (at most one per CPU it may use: fewer under
    taskset or OMP_NUM_THREADS), shared among the processes of its machine, never more."""
    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    try:
        torch.set_num_threads(threads)
        assert cg.distributed_setup(0, 1, "cpu") == torch.device("cpu")
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device, dataset, given, expected", [
    ("cpu", "celeba", None, 0), ("cpu", "toy", None, 2), ("cuda", "celeba", None, 2), ("cpu", "celeba", 3, 3)])
def test_workers_default_to_0_for_celeba_on_a_cpu_else_2(workdir, monkeypatch, device, dataset, given, expected):
    """--workers' default: 0 where the examples come from the image cache and the workers would take the
    training threads' cores (CelebA on a CPU), 2 where they cost more (toy faces, drawn per example) or a
    GPU waits for them; a value given is kept. The parser leaves it open; validate_train_args decides."""
    labelled_celeba(workdir / "data")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    parser, _ = cg.make_parser()
    args = parser.parse_args(["train", "--exp_name", "w", "--dataset", dataset, "--data_root", "data",
                              "--batch_size", "2"] + ([] if given is None else ["--workers", str(given)]))
    assert (args.workers is None) == (given is None)
    cg.validate_train_args(args, torch.device(device), torchrun=False)
    assert args.workers == expected


def test_a_cache_that_cannot_be_written_is_tried_once(workdir, monkeypatch, capsys):
    """Where the image cache cannot be written (its folder would be inside a file here; a read-only
    folder or a full disk alike), the run warns once and trains on images decoded from their files: the
    training process does not decode every image a second time trying to build the cache again."""
    labelled_celeba(workdir / "data")
    (workdir / "blocked").write_text("")
    monkeypatch.setattr(cg, "IMAGE_CACHE", workdir / "blocked" / "image_cache")
    code, out, err = cli(capsys, "train", "--exp_name", "nocache", *TOY, "--dataset", "celeba", "--data_root", "data",
                         "--batch_size", 4, "--max_steps", 2)
    assert code == 0 and "step 2/2" in out, err
    assert out.count("decoding 20 images once") == 1 and err.count("cannot write the image cache") == 1


def test_validation_loss_is_the_loss_of_the_whole_set_in_uneven_batches():
    """Batches of 4, 4 and 2 images, each mean weighted by its size: the loss of all 10 at once, asked
    for their attributes."""
    faces = cg.ToyFaces(16, attributes=list(cg.TOY_ATTRIBUTES))
    model = randomized(cg.DiT(16, 4, dim=64, depth=2, heads=2, num_attributes=len(cg.TOY_ATTRIBUTES))).eval()
    val = cg.validation_set(faces, 10, 0, -0.4, 0.8)
    with torch.no_grad():
        whole = cg.flow_loss(model, val[0], val[1], val[2], 0.2, val[3]).item()
        unasked = cg.flow_loss(model, val[0], val[1], val[2], 0.2, torch.zeros_like(val[3])).item()
    batched = cg.validation_loss(model, val, 0.2, 4, torch.device("cpu"), "fp32")
    assert batched == pytest.approx(whole, rel=1e-5) and abs(unasked - whole) > 1e-4 * whole


def test_an_epoch_is_whole_batches_only():
    """10 images in batches of 4 make 2 steps of 4: every step sees a whole batch, and the 2 images
    left over wait for the next epoch's order."""
    images = Images(torch.zeros(3, 2, 2) for _ in range(10))
    args = argparse.Namespace(seed=0, t_mu=0.0, t_sigma=1.0, attr_dropout=0.0, attr_dropout_all=0.0,
                              batch_size=4, workers=0)
    examples = cg.FlowExamples(images, args)
    sampler = cg.DistributedSampler(examples, 1, 0, seed=0, drop_last=True)
    batches = cg.epoch_batches(examples, sampler, 0, len(sampler) // 4, args, torch.device("cpu"))
    assert [len(x1) for x1, *_ in batches] == [4, 4]


def test_best_pt_is_saved_at_each_new_lowest_validation_loss_only(workdir, capsys, monkeypatch):
    """Validation losses 0.5, 0.3, 0.4, 0.3, 0.2 at steps 1-5: new bests at 1, 2 and 5, not at 3 (higher)
    nor at 4 (a tie: best.pt stays the earlier weights)."""
    losses = iter([0.5, 0.3, 0.4, 0.3, 0.2])
    monkeypatch.setattr(cg, "validation_loss", lambda *args: next(losses))
    saved, save = [], cg.Bookkeeping.save
    monkeypatch.setattr(cg.Bookkeeping, "save", lambda self, name, step: saved.append((name, step)) or
                        save(self, name, step))
    code, out, err = cli(capsys, "train", "--exp_name", "best", *TOY, "--batch_size", 4, "--eval_every", 1,
                         "--max_steps", 5)
    assert code == 0, err
    assert [line.endswith("new best") for line in out.splitlines() if "val loss" in line] == [True, True, False,
                                                                                             False, True]
    assert [step for name, step in saved if name == "best.pt"] == [1, 2, 5]
    assert checkpoint("best", "best.pt")["best_val"] == 0.2


def test_training_times_are_logit_normal_with_the_flags_mu_and_sigma():
    """The examples' times t = sigmoid(mu + sigma n), n ~ N(0, 1): logit(t) has mean mu and spread
    sigma over many examples."""
    images = Images(torch.zeros(3, 1, 1) for _ in range(4000))
    args = argparse.Namespace(seed=0, t_mu=-0.8, t_sigma=0.6, attr_dropout=0.0, attr_dropout_all=0.0)
    logits = torch.logit(torch.stack([cg.FlowExamples(images, args)[i][2] for i in range(4000)]).double())
    assert logits.mean().item() == pytest.approx(-0.8, abs=0.03)
    assert logits.std().item() == pytest.approx(0.6, abs=0.03)


def test_pair_noise_gives_the_images_the_noise_of_the_cheapest_assignment():
    """pair_noise reorders the batch's noise (the same noise vectors) into the order of least total
    squared distance to the images, checked against all 6! orders."""
    generator = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(6, 3, 4, 4, generator=generator), torch.randn(6, 3, 4, 4, generator=generator)
    paired = cg.pair_noise(x1, x0, 0, 1)
    cost = lambda noise: ((x1 - noise) ** 2).sum().item()
    least = min(cost(x0[list(order)]) for order in itertools.permutations(range(6)))
    assert sorted(paired.flatten(1).tolist()) == sorted(x0.flatten(1).tolist())
    assert cost(paired) == pytest.approx(least, rel=1e-6) and least < cost(x0) - 1
    # the squared distance, not the distance: image (0, 0) with noise (0, 0) and image (1, 0) with
    # noise (-0.9, 0.44) cost 0 + 1.95 unsquared, less than 1 + 1, but 0 + 3.8 squared, more
    x1, x0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[-0.9, 0.44], [0.0, 0.0]])
    assert torch.equal(cg.pair_noise(x1.view(2, 1, 1, 2), x0.view(2, 1, 1, 2), 0, 1).view(2, 2), x0)


def test_the_trainer_pairs_the_noise_by_default_and_a_resume_keeps_the_choice(workdir, capsys, monkeypatch):
    """Pairing is on unless --no_pair_noise; --resume refuses to change it, and a checkpoint written
    before pairing existed (no such argument) resumes unpaired."""
    paired, pair_noise = [], cg.pair_noise
    monkeypatch.setattr(cg, "pair_noise", lambda x1, *rest: paired.append(len(x1)) or pair_noise(x1, *rest))
    assert cli(capsys, "train", "--exp_name", "paired", *TOY, "--batch_size", 4, "--max_steps", 2)[0] == 0
    assert paired == [4, 4]
    assert cli(capsys, "train", "--exp_name", "plain", *TOY, "--batch_size", 4, "--max_steps", 2,
               "--no_pair_noise")[0] == 0
    assert paired == [4, 4]
    code, _, err = cli(capsys, "train", "--exp_name", "paired", "--resume", "--max_steps", 3, "--no_pair_noise")
    assert code == 2 and "--resume cannot change --no_pair_noise (pairing) on -> off" in err, err
    code, _, err = cli(capsys, "train", "--exp_name", "paired", "--resume", "--max_steps", 3, "--nproc", 2)
    assert code == 2 and "--resume cannot change --nproc (processes) 1 -> 2" in err, err  # the flags' names
    last = workdir / "experiments" / "plain" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["args"]["pair_noise"]  # as written before pairing existed
    torch.save(ckpt, last)
    code, out, err = cli(capsys, "train", "--exp_name", "plain", "--resume", "--max_steps", 3)
    assert code == 0 and "step 3/3" in out and paired == [4, 4], err


def test_the_progress_line_counts_the_images_of_every_process(capsys, monkeypatch):
    """images/s = batch_size x world_size / seconds per step since the last line (every process
    trains a full batch), FLOP/s = images/s x flops_per_image, and the ETA is the steps left at
    that pace. Here 5 steps in 10 s (celebgen's clock, stopped at 110 s) of 2 processes with
    batches of 8."""
    monkeypatch.setattr(cg, "time", argparse.Namespace(monotonic=lambda: 110.0))
    scalars = {}
    writer = argparse.Namespace(add_scalar=lambda tag, value, step: scalars.update({tag: value}))
    book = argparse.Namespace(args=argparse.Namespace(batch_size=8, world_size=2), clock=100.0,
                              steps_since_log=5, total_steps=100, budget=float("inf"),
                              elapsed=0.0, flops_per_image=0.5e12, writer=writer)
    cg.log_progress(book, 50, 0.25, 1e-3, 0.5)
    assert "| 8.0 img/s | 4.000 TFLOP/s | ETA 1.7 min" in capsys.readouterr().out
    assert scalars["train/images_per_sec"] == 8
    assert (book.clock, book.steps_since_log) == (110.0, 0)
