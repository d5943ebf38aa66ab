"""The trainer and the CLI: DDP equivalence, exact resume, files and logs, and every bad input."""
import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import celebgen as cg
from conftest import ROOT

TOY = ["--dataset", "toy", "--model", "tiny", "--image_size", "16", "--workers", "0", "--precision", "fp32",
       "--val_size", "8", "--num_sampling_steps", "3", "--warmup_steps", "2", "--lr", "1e-3", "--log_every", "1"]


def cli(capsys, *argv):
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    try:
        cg.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def checkpoint(exp_name, name="last.pt"):
    return torch.load(f"experiments/{exp_name}/checkpoints/{name}", weights_only=True)


def random_image_folder(folder, n, size=16):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def labelled_celeba(root):
    """CelebA's official layout: 20 train and 4 val images, 15 of them with a row of attributes."""
    root.mkdir()
    random_image_folder(root / "img_align_celeba", 24)
    names = [f"{i:03d}.png" for i in range(24)]
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {int(i >= 20)}\n" for i, n in enumerate(names)))
    (root / "list_attr_celeba.txt").write_text("15\n" + " ".join(cg.ATTRIBUTE_NAMES) + "\n" + "".join(
        f"{n} " + " ".join("1" if (7 * i + k) % 3 else "-1" for k in range(40)) + "\n" for i, n in enumerate(names[:15])))


def toy_initial_weights():
    """The weights a TOY run starts from: a tiny DiT at 16x16 built after torch.manual_seed(0), the
    trainer's seed."""
    torch.manual_seed(0)
    return cg.DiT(16, 4, **cg.MODELS["tiny"]).state_dict()


def logged_scalars(logs, tag):
    """The events of one TensorBoard scalar, in order of step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(str(logs)).Reload().Scalars(tag)


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(workdir, capsys):
    """2 gloo processes x batch 4 and 1 process x batch 8 see the same examples and take the same steps;
    they differ only by float rounding in the gradient all-reduce (tolerance 1e-5 on weights of size ~0.1).
    Started by torchrun instead of by celebgen's spawn, the 2 processes give the very same weights. The
    runs read CelebA's layout through the image cache (built before the processes start) and are
    conditioned on two attributes, so the examples' dropped attributes must agree too."""
    labelled_celeba(workdir / "images")
    toy = [*TOY, "--dataset", "celeba", "--data_root", "images", "--attributes", "Smiling,Male"]
    code, out, err = cli(capsys, "train", "--exp_name", "two", *toy, "--batch_size", 4, "--max_steps", 3, "--nproc", 2)
    assert code == 0, err
    code, out, _ = cli(capsys, "train", "--exp_name", "one", *toy, "--batch_size", 8, "--max_steps", 3)
    assert code == 0 and "step 3/3" in out and "decoding" not in out  # the cache of the run before
    one, two = checkpoint("one"), checkpoint("two")
    init = toy_initial_weights()
    moved = max((one["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3 and one["model"]["attribute_embed.weight"].shape == (192, 2)  # training did change the weights...
    for part in ("model", "ema"):  # ...and both runs changed them the same way
        diff = max((one[part][k] - two[part][k]).abs().max().item() for k in one[part])
        assert diff < 1e-5, (part, diff)
    # the logged loss of 2 processes is their mean, the loss of the global batch of 8
    losses = [[e.value for e in logged_scalars(workdir / f"experiments/{run}/logs", "train/loss")]
              for run in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)

    # the same 2 processes started by torchrun, which celebgen joins instead of spawning its own
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(ROOT / "celebgen.py"), "train", "--exp_name", "torchrun", *map(str, toy),
                               "--batch_size", "4", "--max_steps", "3"], capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    assert all(torch.equal(two["model"][k], checkpoint("torchrun")["model"][k]) for k in two["model"])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # compiling on a CPU: minutes
def test_compile_takes_the_same_steps_as_eager(workdir, capsys, monkeypatch, recwarn):
    """--compile (torch.compile, whose inductor fuses the elementwise ops between matmuls into
    generated kernels) trains the same weights as eager PyTorch, up to float rounding, without the
    inductor's warning about RoPE's complex product. Slow: the first step compiles for about a minute
    on 2 cores."""
    args = [*TOY, "--batch_size", 4, "--max_steps", 3]
    assert cli(capsys, "train", "--exp_name", "eager", *args)[0] == 0
    calls, compile = [], torch.compile
    monkeypatch.setattr(cg.torch, "compile", lambda model: calls.append(model) or compile(model))
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)  # compile anew: warnings too
    code, out, err = cli(capsys, "train", "--exp_name", "compiled", *args, "--compile")
    assert code == 0 and "step 3/3" in out and len(calls) == 1, err
    assert not [w for w in recwarn if "complex operators" in str(w.message)]
    eager, compiled = checkpoint("eager"), checkpoint("compiled")
    init = toy_initial_weights()
    assert max((eager["model"][k] - init[k]).abs().max().item() for k in init) > 1e-3
    for part in ("model", "ema"):
        assert max((eager[part][k] - compiled[part][k]).abs().max().item() for k in init) < 1e-5, part


@pytest.mark.parametrize("stop_after", [7, 2])
def test_resume_continues_exactly(workdir, capsys, monkeypatch, stop_after):
    """Interrupted (Ctrl-C) after step 7, in the second epoch of 5 steps, or after step 2, before
    guide.pt (at 25% of 12: step 3), and resumed to 12 == 12 steps in one go: the same weights, EMA,
    moments and learning rates (the cooldown of the last 20% included), and the same guide.pt, with
    attribute conditioning on (labelled_celeba)."""
    labelled_celeba(workdir / "images")
    args = [*TOY, "--dataset", "celeba", "--data_root", "images", "--batch_size", 4, "--eval_every", 3,
            "--attributes", "Smiling,Male"]
    code, out, _ = cli(capsys, "train", "--exp_name", "straight", *args, "--max_steps", 12)
    assert code == 0 and "note: 5 of 20 training images have no row in the attribute file" in out
    update_ema = cg.update_ema

    def ctrl_c_in_step(ema, model, step, decay):
        update_ema(ema, model, step, decay)
        if step == stop_after - 1:
            os.kill(os.getpid(), signal.SIGINT)
    with monkeypatch.context() as patch:
        patch.setattr(cg, "update_ema", ctrl_c_in_step)
        code, out, err = cli(capsys, "train", "--exp_name", "resumed", *args, "--max_steps", 12)
    assert code == 130 and f"interrupted at step {stop_after}" in err, err
    assert (workdir / "experiments/resumed/checkpoints/guide.pt").exists() == (stop_after >= 3)
    code, out, err = cli(capsys, "train", "--exp_name", "resumed", "--resume")
    assert code == 0 and f"step {stop_after + 1}/12" in out, err
    a, b = checkpoint("straight"), checkpoint("resumed")
    assert a["step"] == b["step"] == 12 and a["best_val"] == b["best_val"]
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    guides = checkpoint("straight", "guide.pt"), checkpoint("resumed", "guide.pt")
    assert guides[0]["step"] == guides[1]["step"] == 3  # 25% of 12, saved once
    for part in ("model", "ema"):
        assert all(torch.equal(guides[0][part][k], guides[1][part][k]) for k in guides[0][part]), part
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def killed_in_step(n, capsys, monkeypatch, exp_name, *flags):
    """Train exp_name with flags, killed by an error in step n (1-based), before its EMA update."""
    update_ema = cg.update_ema

    def killed(ema, model, step, decay):
        if step == n - 1:
            raise RuntimeError("killed")
        update_ema(ema, model, step, decay)
    with monkeypatch.context() as patch:
        patch.setattr(cg, "update_ema", killed)
        with pytest.raises(RuntimeError, match="killed"):
            cli(capsys, "train", "--exp_name", exp_name, *flags)


def test_a_run_killed_before_its_first_last_pt_resumes_from_its_latest_checkpoint(workdir, capsys, monkeypatch):
    """Killed in step 5 of 8 (an error: no last.pt), after guide.pt (step 2) and best.pt (step 4):
    the fresh command refuses to overwrite them, and --resume continues from the later, best.pt, to
    the weights of an uninterrupted run; with guide.pt alone, from guide.pt, to the same weights,
    leaving guide.pt as it was."""
    args = [*TOY, "--max_steps", 8, "--eval_every", 4, "--ckpt_every", 100]
    assert cli(capsys, "train", "--exp_name", "whole", *args)[0] == 0
    killed_in_step(5, capsys, monkeypatch, "run", *args)
    folder = workdir / "experiments/run/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "guide.pt"]
    code, _, err = cli(capsys, "train", "--exp_name", "run", *args)
    assert code == 2 and "already exists; add --resume" in err, err
    for step, name in ((4, "best.pt"), (2, "guide.pt")):
        code, out, err = cli(capsys, "train", "--exp_name", "run", "--resume")
        assert code == 0 and f"from step {step} ({name})" in out, (out, err)
        a, b = checkpoint("whole"), checkpoint("run")
        assert a["step"] == b["step"] == 8
        assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
        a, b = checkpoint("whole", "guide.pt"), checkpoint("run", "guide.pt")
        assert a["step"] == b["step"] == 2 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
        for cut in ("last.pt", "best.pt"):  # as if killed before both were written
            (folder / cut).unlink()


@pytest.mark.parametrize("max_steps", [1, 3])
def test_a_resume_made_shorter_past_guide_at_saves_guide_pt_at_its_first_step(workdir, capsys, monkeypatch,
                                                                              max_steps):
    """Killed in step 2 of 8 (last.pt of step 1; guide.pt was due at step 2), then resumed with --max_steps
    1 (nothing left to do: nothing is written) or 3 (step 1 is past its 25%): guide.pt is saved at the first
    step the resumed run takes, an EMA earlier than the run's last, which it then guides."""
    killed_in_step(2, capsys, monkeypatch, "short", *TOY, "--max_steps", 8, "--ckpt_every", 1, "--eval_every", 100)
    guide = workdir / "experiments/short/checkpoints/guide.pt"
    assert not guide.exists()
    code, out, err = cli(capsys, "train", "--exp_name", "short", "--resume", "--max_steps", max_steps)
    assert code == 0 and ("already at step 1 of 1" in out) == (max_steps == 1), err
    assert checkpoint("short")["step"] == max_steps and guide.exists() == (max_steps == 3)
    if max_steps == 3:
        assert checkpoint("short", "guide.pt")["step"] == 2
        code, out, err = cli(capsys, "sample", "--exp_name", "short", "--num_samples", 1, "--num_sampling_steps", 2)
        assert code == 0 and f"by {Path('experiments/short/checkpoints/guide.pt')} (step 2)" in out, err


def test_a_guide_pt_later_than_the_resumed_checkpoint_is_saved_again(workdir, capsys, monkeypatch):
    """A run killed after guide.pt but before the last.pt that would follow it resumes from an earlier
    step, so the guide.pt left behind is from a future it will retrace: the resumed run saves guide.pt
    anew at 25% (step 2 of 8), equal to an uninterrupted run's."""
    args = [*TOY, "--max_steps", 8, "--ckpt_every", 1, "--eval_every", 100]
    assert cli(capsys, "train", "--exp_name", "whole", *args)[0] == 0
    killed_in_step(2, capsys, monkeypatch, "run", *args)  # last.pt of step 1, no guide.pt yet
    folder = workdir / "experiments/run/checkpoints"
    shutil.copy(workdir / "experiments/whole/checkpoints/last.pt", folder / "guide.pt")  # as of step 8
    assert cli(capsys, "train", "--exp_name", "run", "--resume")[0] == 0
    a, b = checkpoint("whole", "guide.pt"), checkpoint("run", "guide.pt")
    assert a["step"] == b["step"] == 2 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


@pytest.mark.parametrize("longer", [32, 8])
def test_a_run_extended_by_resume_replaces_a_too_early_guide_pt_while_it_can(workdir, capsys, longer):
    """A 4-step run saves guide.pt at step 1, 1/32 or 1/8 of the run that --resume --max_steps 32 or 8
    extends it to: at 32, its 25% (step 8) is still ahead, and guide.pt is saved again there; at 8,
    step 2 is past, and the step-1 guide.pt stays, with a line that says so."""
    assert cli(capsys, "train", "--exp_name", "ext", *TOY, "--max_steps", 4, "--eval_every", 100)[0] == 0
    assert checkpoint("ext", "guide.pt")["step"] == 1
    code, out, err = cli(capsys, "train", "--exp_name", "ext", "--resume", "--max_steps", longer)
    shown = Path("experiments/ext/checkpoints/guide.pt")
    said = {32: f"{shown} was saved at 3% of this run, by a shorter one: it is saved again at 25%",
            8: f"{shown} was saved at 12% of this run, by a shorter one: 25% is past, so it stays the guide"}
    assert code == 0 and said[longer] in out, (out, err)
    assert checkpoint("ext", "guide.pt")["step"] == {32: 8, 8: 1}[longer]


def test_the_progress_line_counts_the_models_flops(workdir, capsys, monkeypatch):
    """The TFLOP/s of the progress line is images/s x the model's training FLOPs per image."""
    counted, log_progress = [], cg.log_progress

    def record(book, step, *numbers):
        counted.append(book.flops_per_image)
        log_progress(book, step, *numbers)
    with monkeypatch.context() as patch:
        patch.setattr(cg, "log_progress", record)
        assert cli(capsys, "train", "--exp_name", "flops", *TOY, "--max_steps", 3)[0] == 0
    assert counted == [cg.flops_per_image(cg.DiT(16, 4, **cg.MODELS["tiny"]))] * 3
    # the line itself: 32 images a step, 1 s a step, at 1e11 FLOPs each, are 3.2 TFLOP/s
    book = argparse.Namespace(args=argparse.Namespace(batch_size=32, world_size=1), steps_since_log=1000,
                              clock=cg.time.monotonic() - 1000.0, total_steps=2000, budget=math.inf, elapsed=0.0,
                              flops_per_image=1e11, writer=argparse.Namespace(add_scalar=lambda *a: None))
    log_progress(book, 1, 0.5, 1e-3, 0.1)
    assert "| 3.200 TFLOP/s |" in capsys.readouterr().out


def test_ctrl_c_while_the_image_cache_is_built_stops_at_once(workdir, capsys, monkeypatch):
    """Before the first step there is no step to finish: Ctrl-C stops at once (exit 130), leaving no
    checkpoint and no cache file, and the same command then runs."""
    labelled_celeba(workdir / "images")
    args = ["train", "--exp_name", "x", *TOY, "--dataset", "celeba", "--data_root", "images", "--batch_size", 4,
            "--max_steps", 2]
    load_pixels, calls = cg.load_pixels, []

    def ctrl_c(path, size):  # once, at the first image
        calls.append(path)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return load_pixels(path, size)
    with monkeypatch.context() as patch:
        patch.setattr(cg, "load_pixels", ctrl_c)
        code, out, err = cli(capsys, *args)
    assert code == 130 and "interrupted" in err and "decoding 20 images" in out, (out, err)
    assert not list((workdir / "experiments").glob("*/*/*.pt")) and not list((workdir / "experiments").glob("*/*"))
    code, out, err = cli(capsys, *args)
    assert code == 0 and "decoding 20 images" in out and checkpoint("x")["step"] == 2, err


def test_cli_trains_logs_and_samples(workdir):
    run = lambda *argv: subprocess.run([sys.executable, str(ROOT / "celebgen.py"), *map(str, argv)],
                                       capture_output=True, text=True, timeout=300)
    train = run("train", "--exp_name", "e2e", *TOY, "--batch_size", 4, "--max_steps", 4, "--eval_every", 2,
                "--sample_every", 2)
    assert train.returncode == 0, train.stderr
    assert "step 4/4" in train.stdout and "img/s" in train.stdout and "val loss" in train.stdout
    exp = workdir / "experiments" / "e2e"
    assert {p.name for p in (exp / "checkpoints").iterdir()} == {"last.pt", "best.pt", "guide.pt"}
    assert checkpoint("e2e", "guide.pt")["step"] == 1  # the step that reached 25% of 4 steps
    assert (exp / "samples" / "step_0000004.png").is_file() and (exp / "args.json").is_file()

    smp = run("sample", "--exp_name", "e2e", "--checkpoint", "best.pt", "--num_samples", 5,
              "--num_sampling_steps", 3, "--batch_size", 2)
    assert smp.returncode == 0, smp.stderr
    images = sorted((exp / "samples" / "best_euler3_seed0").glob("*.png"))
    assert len(images) == 5 and Image.open(images[0]).size == (16, 16)
    assert (exp / "samples" / "best_euler3_seed0.png").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(exp / "logs")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/images_per_sec"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "samples" in events.Tags()["images"]


@pytest.mark.parametrize("argv,message", [
    (["--data_root", "missing"], "--data_root missing does not exist"),
    (["--data_root", "empty"], "no images in empty"),
    (["--data_root", "three/000.png"], "--data_root three/000.png is a file, not a folder"),
    ([*TOY, "--image_size", 30], "--image_size 30 is not divisible by --patch_size 4"),
    ([*TOY, "--batch_size", 0], "argument --batch_size: must be positive, got 0"),
    ([*TOY, "--image_size", -8], "argument --image_size: must be positive"),
    ([*TOY, "--nproc", 64], "--nproc 64 is more than"),
    ([*TOY, "--batch_size", 8, "--data_root", "three", "--dataset", "celeba"], "only 3 training images"),
    ([*TOY, "--max_steps", 1, "--attributes", ""], "argument --attributes: '' names no attribute; give"),
    ([*TOY, "--max_steps", 1, "--attributes", " , "], "argument --attributes: ' , ' names no attribute"),
    ([*TOY, "--max_steps", 1, "--data_root", "three"],
     "toy faces are drawn, not read: drop --data_root three, or drop --dataset toy"),
    ([*TOY, "--max_steps", 1, "--download"], "toy faces are drawn, not read: drop --download, or drop --dataset toy"),
])
def test_bad_train_input_is_one_line_and_writes_nothing(workdir, capsys, argv, message):
    (workdir / "empty").mkdir()
    random_image_folder(workdir / "three", 3)
    code, out, err = cli(capsys, "train", "--exp_name", "bad", *argv)
    assert code == 2 and err.count("\n") == 1 and message in err and err.startswith("error: "), err
    assert not (workdir / "experiments").exists()


def test_a_grid_is_as_square_as_its_count_allows():
    """image_grid lays B images in ceil(sqrt(B)) columns with 2-pixel gaps: 16 in 4 x 4, 5 in 3 + 2."""
    assert cg.image_grid(torch.zeros(16, 3, 4, 4)).shape == (3, 4 * 6 + 2, 4 * 6 + 2)
    assert cg.image_grid(torch.zeros(5, 3, 4, 4)).shape == (3, 2 * 6 + 2, 3 * 6 + 2)


def test_the_resume_command_runs_from_the_current_folder(monkeypatch, tmp_path):
    """The command a stopped run prints works where the user is: in celebgen.py's folder, in a
    folder above it, or elsewhere (then with the absolute path, quoted if it has a space)."""
    for folder, script in [(ROOT, "celebgen.py"), (ROOT.parent, str(Path(ROOT.name, "celebgen.py"))),
                           (ROOT / "tests", str(ROOT / "celebgen.py"))]:
        monkeypatch.chdir(folder)
        assert cg.resume_command("x") == f"python {script} train --exp_name x --resume"
    monkeypatch.setattr(cg, "__file__", str(tmp_path / "my code" / "celebgen.py"))
    assert cg.resume_command("x") == f"python '{tmp_path}/my code/celebgen.py' train --exp_name x --resume"


def test_a_toy_run_saved_with_another_data_root_still_resumes(workdir, capsys):
    """Toy faces refuse --data_root, but not on resume: a run may have saved one (older versions
    took it), and its resume must not fail on a flag nobody gave."""
    assert cli(capsys, "train", "--exp_name", "old", *TOY, "--batch_size", 4, "--max_steps", 1)[0] == 0
    last = workdir / "experiments/old/checkpoints/last.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["args"]["data_root"] = "elsewhere"
    torch.save(ckpt, last)
    args_json = workdir / "experiments/old/args.json"
    args_json.write_text(args_json.read_text().replace('"./data"', '"elsewhere"'))
    code, _, err = cli(capsys, "train", "--exp_name", "old", "--resume", "--max_steps", 2)
    assert code == 0 and torch.load(last, weights_only=False)["step"] == 2, err


@pytest.fixture
def trained(workdir, capsys):
    """A finished 2-step experiment 'done'."""
    assert cli(capsys, "train", "--exp_name", "done", *TOY, "--batch_size", 4, "--max_steps", 2)[0] == 0
    return workdir / "experiments" / "done" / "checkpoints" / "last.pt"


def test_existing_experiment_is_never_overwritten(trained, capsys):
    before = trained.read_bytes()
    code, _, err = cli(capsys, "train", "--exp_name", "done", *TOY)
    assert code == 2 and "already exists; add --resume" in err
    assert trained.read_bytes() == before


@pytest.mark.parametrize("flags,change", [(["--model", "small"], "--model tiny -> small"),
                                          (["--attributes", "Smiling"], "--attributes (none) -> Smiling"),
                                          (["--dataset", "celeba"], "--dataset toy -> celeba: they fix the model")])
def test_resume_with_another_model_config_is_refused(trained, capsys, flags, change):
    code, _, err = cli(capsys, "train", "--exp_name", "done", "--resume", *flags)
    assert code == 2 and f"--resume cannot change {change}" in err, err


def test_a_run_shorter_than_its_warm_up_says_so(workdir, capsys):
    """3 steps within a warm-up of 5: the learning rate never reaches --lr, and a note says so; with a
    warm-up of 3 the last step is taken at --lr: no note."""
    code, out, err = cli(capsys, "train", "--exp_name", "short", *TOY, "--max_steps", 3, "--warmup_steps", 5)
    note = "note: the run's 3 steps end within --warmup_steps 5: the learning rate never reaches --lr 0.001"
    assert code == 0 and note in out, err
    code, out, err = cli(capsys, "train", "--exp_name", "long", *TOY, "--max_steps", 3, "--warmup_steps", 3)
    assert code == 0 and "never reaches" not in out, err


def test_resume_of_nothing_is_refused_and_a_folder_without_experiments_is_named(workdir, capsys):
    """Run where no experiments/ is (not where train ran), --resume and sample name the folder."""
    here = f"there is no experiments/ in {workdir}: run the command where train ran\n"
    code, _, err = cli(capsys, "train", "--exp_name", "never", "--resume", *TOY)
    assert code == 2 and err.startswith("error: nothing to resume") and err.endswith(here), err
    code, _, err = cli(capsys, "sample", "--exp_name", "never")
    assert code == 2 and err.startswith("error: there is no experiment never") and err.endswith(here), err
    (workdir / "experiments").mkdir()
    code, _, err = cli(capsys, "train", "--exp_name", "never", "--resume", *TOY)
    assert code == 2 and err.endswith("; drop --resume to start experiment 'never'\n"), err


def test_truncated_checkpoint_is_reported_not_loaded(trained, capsys):
    trained.write_bytes(trained.read_bytes()[:5000])
    for argv in (["sample", "--exp_name", "done"], ["train", "--exp_name", "done", "--resume"]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "is unreadable" in err and "truncated or corrupt" in err and err.count("\n") == 1
    trained.write_text("step,loss\n1,0.5\n")  # another program's file under the checkpoint's name
    code, _, err = cli(capsys, "sample", "--exp_name", "done")
    assert code == 2 and "last.pt is not a PyTorch file, so not a checkpoint" in err and err.count("\n") == 1
    np.savez(trained.with_suffix(".npz"), mu=np.zeros(3))  # a zip archive too, as torch.save's
    code, _, err = cli(capsys, "sample", "--exp_name", "done", "--checkpoint", trained.with_suffix(".npz"))
    assert code == 2 and "last.npz is not a PyTorch file, so not a checkpoint" in err and err.count("\n") == 1


def test_checkpoint_whose_weights_do_not_fit_its_config(trained, capsys):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["args"]["model"] = "small"  # tiny weights under a small config
    torch.save(ckpt, trained)
    code, _, err = cli(capsys, "sample", "--exp_name", "done", "--num_samples", 1)
    assert code == 2 and "do not fit the model" in err and err.count("\n") == 1, err


def test_missing_checkpoint_name(trained, capsys):
    code, _, err = cli(capsys, "sample", "--exp_name", "done", "--checkpoint", "nope.pt")
    assert code == 2 and "nope.pt does not exist" in err


def test_a_checkpoint_name_means_the_experiment_s_before_a_file_here(trained, capsys):
    Path("last.pt").write_text("another file of that name, in the working folder")
    code, out, err = cli(capsys, "sample", "--exp_name", "done", "--num_samples", 1, "--num_sampling_steps", 1)
    assert code == 0 and "wrote 1 image to experiments/done/samples/last_euler1_seed0/" in out, err
    code, out, err = cli(capsys, "sample", "--exp_name", "done", "--checkpoint", "./last.pt")
    assert code == 2 and "last.pt" in err and "Traceback" not in err  # a path is the file given
    Path("downloads").mkdir()
    shutil.copy(trained, "downloads/last.pt")  # a checkpoint outside any experiment
    code, out, err = cli(capsys, "sample", "--exp_name", "done", "--checkpoint", "downloads/last.pt",
                         "--num_samples", 1, "--num_sampling_steps", 1)
    assert code == 0 and "samples/downloads_last_euler1_seed0/" in out, err
    shutil.copy(trained, "last.pt")  # a checkpoint here, and a mistyped --exp_name: not sampled
    code, out, err = cli(capsys, "sample", "--exp_name", "dnoe", "--num_samples", 1, "--num_sampling_steps", 1)
    assert code == 2 and "there is no experiment dnoe (experiments/dnoe does not exist)" in err, out
    assert not Path("experiments/dnoe").exists()


@pytest.mark.parametrize("poison", ["loss", "gradients", "loss_fp16", "loss_unsaved"])
def test_divergence_stops_before_the_bad_step_is_taken_or_saved(workdir, capsys, monkeypatch, poison):
    """At step 3 either the loss is NaN, or the loss is finite but the gradients are NaN, or (fp16, where
    GradScaler skips the step) the loss is NaN: the run stops with one line, and the checkpoint (written
    every step) keeps step 2's finite weights; the line says how to go on from it at half the learning
    rate, or, when no checkpoint was written, to start again at half of it."""
    real_loss, calls = cg.flow_loss, []

    def diverging_loss(model, *args):
        calls.append(1)
        loss = real_loss(model, *args)
        if len(calls) != 3:
            return loss
        if poison.startswith("loss"):
            return loss * float("nan")
        return loss + 0 * torch.sqrt(0 * next(model.parameters()).sum())  # value 0, gradient 0 * inf = nan
    monkeypatch.setattr(cg, "flow_loss", diverging_loss)
    precision = "fp16" if poison == "loss_fp16" else "fp32"
    saves = ["--ckpt_every", 100, "--eval_every", 100] if poison == "loss_unsaved" else ["--ckpt_every", 1]
    code, _, err = cli(capsys, "train", "--exp_name", "boom", *TOY, "--batch_size", 4, "--max_steps", 20,
                       *saves, "--precision", precision, "--lr", 1e-3)
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]  # fp16 is slow here
    fix = ("the same command with --lr 0.0005" if poison == "loss_unsaved" else
           f"python {ROOT / 'celebgen.py'} train --exp_name boom --resume --lr 0.0005")
    assert code == 2 and len(lines) == 1 and lines[0].endswith(
        f"at step 3: training diverged; lower the learning rate: {fix}"), err
    if poison == "loss_unsaved":
        assert not list(Path("experiments/boom/checkpoints").iterdir())
        return
    assert ("loss nan" in err) == poison.startswith("loss")
    ckpt = checkpoint("boom")
    assert ckpt["step"] == 2 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    # the TensorBoard record of the steps before is on disk, though the run ended in an error
    assert [e.step for e in logged_scalars(workdir / "experiments/boom/logs", "train/loss")] == [1, 2]


def test_errors_reach_the_shell_as_one_line_without_a_traceback(workdir):
    for argv in (["train", "--exp_name", "x", "--nproc", "64", "--dataset", "toy"],
                 ["train", "--exp_name", "x", "--batch_size", "-1"],
                 ["sample", "--exp_name", "nothing"]):
        run = subprocess.run([sys.executable, str(ROOT / "celebgen.py"), *argv], capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
