"""What a user sees when things go wrong: one line, a non-zero exit, no traceback, nothing written outside
experiments/, earlier checkpoints intact, and never a run that can neither be resumed nor restarted."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import celebgen as cg
import fid
from conftest import ROOT
from test_training import TOY, checkpoint, cli, labelled_celeba, random_image_folder

SMALL_RUN = [*TOY, "--batch_size", 4]


def one_line_error(code, err, expected):
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- arguments ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["train", "--exp_name", "a", "--max_step", 5], "--max_step 5; did you mean --max_steps? (see celebgen.py train"),
    (["train", "--exp_name", "a", "--num_samples=5"], "--num_samples=5; it is a flag of sample (see celebgen.py "
                                                      "train --help)"),
    (["sample", "--exp_name", "a", "extra"], "unrecognized arguments: extra (see celebgen.py sample --help)"),
    (["train", "--exp_name", "a", "--", "--lr", 1], "arguments: -- --lr 1 (see celebgen.py train --help)"),
    (["train", "-exp_name", "a"], "required: --exp_name (see celebgen.py train --help); -exp_name has one dash: "
                                  "use --exp_name"),
    (["sample", "-exp_name=a", "-seed", 1], "-exp_name=a has one dash: use --exp_name=a"),
    (["train", "--t_mu", "-0.4"], "required: --exp_name (see celebgen.py train --help)\n"),  # a number
])
def test_an_unknown_flag_is_named_with_the_one_meant(workdir, capsys, argv, message):
    one_line_error(*cli(capsys, *argv)[::2], message)
    assert files_under(workdir) == []


@pytest.mark.parametrize("name", ["../escaped", "/abs/x", "", ".", "..", "a/b", "a b", "x" * 101, "fid_refs",
                                  "-x"])  # -x: its resume command would read it as a flag
@pytest.mark.parametrize("command", ["train", "sample", "fid"])
def test_exp_name_is_a_plain_name(workdir, capsys, command, name):
    name = name.replace("/abs", str(workdir / "abs"))
    argv = [f"--exp_name={name}"]
    if command == "fid":
        with pytest.raises(SystemExit) as e:
            fid.main(argv)
        code, err = e.value.code, capsys.readouterr().err
    else:
        code, _, err = cli(capsys, command, *argv, *(TOY if command == "train" else []))
    one_line_error(code, err, "holds a cache; choose another name" if name == "fid_refs" else "is not a plain name")
    assert files_under(workdir) == [] and not (workdir.parent / "escaped").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--workers", "-1", "must be >= 0"), ("--workers", "two", "expected an integer"),
    ("--ema_decay", "1", "must be < 1"), ("--ema_decay", "-0.1", "must be >= 0"),
    ("--ema_decay", "nan", "must be a finite number"), ("--lr", "nan", "must be a finite number"),
    ("--lr", "inf", "must be a finite number"), ("--t_eps", "nan", "must be a finite number"),
    ("--t_mu", "nan", "must be a finite number"), ("--seed", "-1", "must be >= 0"),
])
def test_out_of_range_numbers_are_refused_up_front(workdir, capsys, flag, value, message):
    code, _, err = cli(capsys, "train", "--exp_name", "bad", *TOY, flag, value)
    one_line_error(code, err, f"argument {flag}: {message}")
    assert files_under(workdir) == []


# --- no dead ends ---------------------------------------------------------------------------------------

def corrupt_folder(folder, n=6):
    folder.mkdir()
    for i in range(n):
        (folder / f"{i}.png").write_bytes(b"not a png")


def test_a_start_that_failed_before_its_first_checkpoint_can_simply_be_rerun(workdir):
    """An all-corrupt folder read by 2 DataLoader workers fails after experiments/x exists: the worker's
    error reaches the shell as the same one line as without workers, and re-running starts afresh."""
    corrupt_folder(workdir / "bad")
    run = lambda *argv: subprocess.run([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name", "x",
                                        *map(str, argv)], capture_output=True, text=True, timeout=300)
    errors = []
    for workers in ("2", "0"):
        failed = run(*TOY, "--dataset", "celeba", "--data_root", "bad", "--batch_size", 2, "--workers", workers)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        errors.append(failed.stderr.strip().splitlines()[-1])
    assert errors[0] == errors[1] and errors[0].startswith("error: none of the 6 images under"), errors
    assert not (workdir / "experiments/x/checkpoints/last.pt").exists()
    resumed = run("--resume")
    assert resumed.returncode == 2 and "nothing to resume" in resumed.stderr and "drop --resume" in resumed.stderr
    again = run(*SMALL_RUN, "--max_steps", 2)
    assert again.returncode == 0 and "has no checkpoint yet: starting it afresh" in again.stdout, again.stderr
    assert checkpoint("x")["step"] == 2


def test_compile_without_a_working_compiler_is_one_line_and_the_run_can_go_on_without_it(
        workdir, capsys, monkeypatch):
    """torch.compile compiles at the first step; without a C++ compiler (as on Windows without MSVC)
    inductor raises a BackendCompilerFailed (seen with CXX=/nonexistent: InductorError, its subclass,
    'InvalidCxxCompiler: No working C++ compiler found'). Simulated here: one line naming the fix, exit
    2, no checkpoint; the same command without --compile then starts the experiment afresh."""
    def no_compiler(model):
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(
                "inductor", RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)
        return fail
    monkeypatch.setattr(cg.torch, "compile", no_compiler)
    args = ["train", "--exp_name", "c", *TOY, "--batch_size", 4, "--max_steps", 2]
    code, out, err = cli(capsys, *args, "--compile")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --compile failed (")
    assert "No working C++ compiler found" in err and "train without --compile" in err, err
    assert not (workdir / "experiments/c/checkpoints/last.pt").exists()
    code, out, err = cli(capsys, *args)
    assert code == 0 and "starting it afresh" in out and checkpoint("c")["step"] == 2, err


def test_ctrl_c_saves_the_finished_step_and_resumes_exactly(workdir):
    """Ctrl-C in a terminal signals the whole process group (here: the trainer and its DataLoader worker).
    The run finishes its step, saves it, prints one line and exits 130; resuming from there gives the
    weights of an uninterrupted run."""
    args = [*map(str, SMALL_RUN), "--workers", "1", "--ckpt_every", "1000", "--eval_every", "1000"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name", "cut", *args,
                             "--max_steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=os.setpgrp)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    step = checkpoint("cut")["step"]
    assert step >= 3 and last == (f"interrupted at step {step}; experiments/cut/checkpoints/last.pt holds step "
                                  f"{step}; resume with: python {ROOT / 'celebgen.py'} train --exp_name cut --resume")
    resume = subprocess.run([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name", "cut", "--resume",
                             "--max_steps", str(step + 2)], capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    straight = subprocess.run([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name", "straight",
                               *args, "--max_steps", str(step + 2)], capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    a, b = checkpoint("cut"), checkpoint("straight")
    assert a["step"] == b["step"] == step + 2
    assert all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])


@pytest.mark.parametrize("saved", [True, False])
def test_a_second_ctrl_c_stops_mid_step_and_says_what_to_resume(workdir, capsys, monkeypatch, saved):
    """Two Ctrl-Cs within step 4: the run stops at once, mid-step, in one line (after the first's)
    naming the last checkpoint written and the command that resumes it, or, with none written yet,
    the same command again; the checkpoint is the one of step 3, intact, and it resumes."""
    real_clip = cg.clip_gradients
    def ctrl_c_twice(parts, loss, step, args):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_clip(parts, loss, step, args)
    monkeypatch.setattr(cg, "clip_gradients", ctrl_c_twice)
    every = 1 if saved else 1000
    code, _, err = cli(capsys, "train", "--exp_name", "twice", *SMALL_RUN, "--max_steps", 20,
                       "--ckpt_every", every, "--eval_every", every)  # guide.pt: at step 5
    first, last = err.strip().splitlines()
    assert code == 130 and first == "Ctrl-C: stopping after this step (Ctrl-C again to stop at once)"
    if not saved:
        assert last == "stopped at once; no checkpoint was written yet: run the same command again"
        assert not (workdir / "experiments/twice/checkpoints/last.pt").exists()
        return
    assert last == (f"stopped at once; experiments/twice/checkpoints/last.pt (step 3) is intact; "
                    f"resume with: python {ROOT / 'celebgen.py'} train --exp_name twice --resume")
    assert checkpoint("twice")["step"] == 3
    monkeypatch.setattr(cg, "clip_gradients", real_clip)
    assert cli(capsys, "train", "--exp_name", "twice", "--resume", "--max_steps", 5)[0] == 0


def test_ctrl_c_after_the_last_step_says_the_run_is_complete(workdir, capsys, monkeypatch):
    """Ctrl-C while the last step is validated: nothing is left to stop; the run saves as planned,
    exits 0, and its last line says so, after the first Ctrl-C's."""
    real_validation_loss = cg.validation_loss

    def ctrl_c_at_the_end(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real_validation_loss(*args)
    monkeypatch.setattr(cg, "validation_loss", ctrl_c_at_the_end)
    code, _, err = cli(capsys, "train", "--exp_name", "end", *SMALL_RUN, "--max_steps", 3, "--eval_every", 100)
    assert code == 0 and err.strip().splitlines() == [
        "Ctrl-C: stopping after this step (Ctrl-C again to stop at once)",
        "the stop came after the last step: the run is complete; experiments/end/checkpoints/last.pt holds step 3"]
    assert checkpoint("end")["step"] == 3


@pytest.mark.parametrize("program", ["celebgen.py", "fid.py"])
def test_ctrl_c_while_torch_loads_ends_quietly(workdir, program):
    """Ctrl-C in the first second, while the imports load (a few seconds): the process ends at once, as
    by SIGINT (the shell's 130), with no traceback, or, on a machine that loads faster, in one line."""
    proc = subprocess.Popen([sys.executable, str(ROOT / program), *(["sample"] if program == "celebgen.py" else []),
                             "--exp_name", "x"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in err and err.count("\n") <= 1, err


def test_ctrl_c_under_ddp_saves_and_says_so_once(workdir):
    """2 gloo processes: both stop after the same step, rank 0 saves and prints the one line, exit 130."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name", "ddp",
                             *map(str, SMALL_RUN), "--nproc", "2", "--max_steps", "100000", "--eval_every", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    step = checkpoint("ddp")["step"]
    assert proc.returncode == 130 and "Traceback" not in err and step >= 3, err
    assert err.count("Ctrl-C: stopping after this step") == 1 and err.count("interrupted at step") == 1
    assert err.strip().splitlines()[-1] == (f"interrupted at step {step}; experiments/ddp/checkpoints/last.pt holds "
                                            f"step {step}; resume with: python {ROOT / 'celebgen.py'} train --exp_name ddp --resume")


@pytest.mark.parametrize("flag,value", [("--batch_size", 8), ("--seed", 1), ("--val_size", 4), ("--t_mu", 0.0),
                                        ("--t_sigma", 1.0), ("--t_eps", 0.1)])
def test_resume_refuses_changes_that_would_make_it_inexact(workdir, capsys, flag, value):
    assert cli(capsys, "train", "--exp_name", "run", *SMALL_RUN, "--max_steps", 2)[0] == 0
    before = checkpoint("run")
    code, _, err = cli(capsys, "train", "--exp_name", "run", "--resume", flag, value, "--max_steps", 4)
    one_line_error(code, err, f"--resume cannot change {flag} ")
    assert torch.equal(checkpoint("run")["model"]["out.weight"], before["model"]["out.weight"])


def test_resume_refuses_other_images_and_takes_the_same_images_elsewhere(workdir, capsys):
    labelled_celeba(workdir / "images")
    celeba = ["--dataset", "celeba", "--workers", 0]
    assert cli(capsys, "train", "--exp_name", "run", *SMALL_RUN, *celeba, "--data_root", "images",
               "--max_steps", 2)[0] == 0
    shutil.copytree(workdir / "images", workdir / "others")
    split = workdir / "others" / "list_eval_partition.txt"
    split.write_text(split.read_text().replace("019.png 0", "019.png 1"))  # one more val image
    code, _, err = cli(capsys, "train", "--exp_name", "run", "--resume", "--data_root", "others", "--max_steps", 3)
    one_line_error(code, err, "--resume cannot change --data_root (training images) 20 -> 19, --data_root "
                              "(validation images) 4 -> 5: they fix")
    assert "drop those flags (--data_root: point it at the run's own images)" in err
    (workdir / "images/img_align_celeba/003.png").rename(workdir / "003.png")  # an image taken away
    code, _, err = cli(capsys, "train", "--exp_name", "run", "--resume", "--max_steps", 3)
    one_line_error(code, err, "--data_root images now holds other images than the run trained on (training "
                              "images 20 -> 19); put back the images moved or removed since")
    (workdir / "003.png").rename(workdir / "images/img_align_celeba/003.png")
    shutil.move(workdir / "images", workdir / "moved")
    code, _, err = cli(capsys, "train", "--exp_name", "run", "--resume", "--max_steps", 3)  # the saved root
    one_line_error(code, err, "--data_root images does not exist; a resumed run trains on its own images: point "
                              "--data_root at where they are now")
    code, _, err = cli(capsys, "train", "--exp_name", "run", "--resume", "--data_root", "moved", "--max_steps", 3)
    assert code == 0 and checkpoint("run")["step"] == 3, err


def test_nproc_is_bounded_by_the_cpu_cores_this_process_may_use(workdir, capsys, monkeypatch):
    """Under taskset or a container's CPU set, --nproc counts the cores the process may run on, not the
    machine's: two processes on one allowed core are refused."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    code, _, err = cli(capsys, "train", "--exp_name", "bad", *SMALL_RUN, "--nproc", 2, "--max_steps", 1)
    one_line_error(code, err, "--nproc 2 is more than the 1 CPU cores here; use --nproc 1 or fewer")
    assert files_under(workdir) == []


def test_global_batch_under_torchrun_counts_its_processes(workdir, capsys, monkeypatch):
    random_image_folder(workdir / "images", 6)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, _, err = cli(capsys, "train", "--exp_name", "tr", *TOY, "--dataset", "celeba", "--data_root", "images",
                       "--batch_size", 2)
    one_line_error(code, err, "only 6 training images for a global batch of 2 x 4 processes")


# --- checkpoints ------------------------------------------------------------------------------------------

@pytest.fixture
def trained(workdir, capsys):
    assert cli(capsys, "train", "--exp_name", "done", *SMALL_RUN, "--max_steps", 2)[0] == 0
    return workdir / "experiments" / "done" / "checkpoints" / "last.pt"


EDITED_ARGS = {"unknown_model": {"model": "huge"}, "patch_0": {"patch_size": 0}, "size_text": {"image_size": "16"},
               "size_not_divisible": {"patch_size": 3}, "patch_float": {"patch_size": 4.0},  # 4: the default
               "attributes_text": {"attributes": "Smiling"}, "model_list": {"model": ["tiny"]},
               "seed_negative": {"seed": -1}, "seed_text": {"seed": "0"}, "batch_0": {"batch_size": 0},
               "batch_float": {"batch_size": 4.0}, "t_eps_negative": {"t_eps": -1.0},
               "dataset_unknown": {"dataset": "imagenet"}, "data_root_number": {"data_root": 5}}


@pytest.mark.parametrize("foreign", ["state_dict", "tensor", "no_args_model", "args_list", *EDITED_ARGS])
def test_a_foreign_torch_file_is_not_a_checkpoint(trained, capsys, foreign):
    """Another program's file, or a checkpoint whose model arguments were edited into what no run
    writes: one line for `sample` and for `train --resume`, before any network is built."""
    ckpt = torch.load(trained, weights_only=True)
    if foreign == "no_args_model":
        del ckpt["args"]["model"]
    elif foreign == "args_list":
        ckpt["args"] = ["tiny", 16, 4]
    elif foreign in EDITED_ARGS:
        ckpt["args"].update(EDITED_ARGS[foreign])
    content = {"state_dict": {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)},
               "tensor": torch.zeros(3)}.get(foreign, ckpt)
    torch.save(content, trained)
    for argv in (["sample", "--exp_name", "done"], ["train", "--exp_name", "done", "--resume"]):
        code, _, err = cli(capsys, *argv)
        one_line_error(code, err, "is not a CelebGen checkpoint")


@pytest.mark.parametrize("case", ["best.pt", "guide.pt", "read_only"])
def test_a_resume_that_could_not_save_is_refused_before_training(trained, capsys, monkeypatch, case):
    """A folder where a checkpoint goes, or a read-only checkpoints/, would fail the run at its
    first save, after minutes of training: refused in one line first."""
    monkeypatch.setattr(cg, "train_loop", lambda *a: pytest.fail("trained before the check"))
    checkpoints = trained.parent
    if case == "read_only":  # as a read-only folder (root ignores permissions): EROFS on a write
        temporary = cg.tempfile.TemporaryFile
        monkeypatch.setattr(cg.tempfile, "TemporaryFile", lambda dir=None: (_ for _ in ()).throw(
            OSError(cg.errno.EROFS, "Read-only file system")) if Path(dir).resolve() == checkpoints.resolve()
            else temporary(dir=dir))
        message = ("cannot write in experiments/done/checkpoints (Read-only file system); make "
                   "experiments/done/checkpoints writable")
    else:
        (checkpoints / case).unlink(missing_ok=True)
        (checkpoints / case).mkdir()
        message = f"experiments/done/checkpoints/{case} is a folder, where the run's {case} goes; move it away"
    code, _, err = cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 4)
    one_line_error(code, err, message)


def test_resume_whose_weights_do_not_fit_its_arguments(trained, capsys):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["args"]["patch_size"] = 2  # tiny weights for 4x4 patches under a 2x2-patch config
    torch.save(ckpt, trained)
    args_json = trained.parents[1] / "args.json"  # the run's record says so too: its own run
    args_json.write_text(json.dumps({**json.loads(args_json.read_text()), "patch_size": 2}))
    code, _, err = cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 4)
    one_line_error(code, err, "do not fit the model its arguments describe (--model tiny, --image_size 16, "
                              "--patch_size 2, --attributes (none))")


@pytest.mark.parametrize("architecture", [None, 1, cg.ARCHITECTURE + 1])
def test_a_checkpoint_of_another_network_version_is_refused_in_one_line(trained, capsys, architecture):
    """Weights of another version of the network's arithmetic load without an error and draw noise, so
    sample, train --resume and fid.py refuse them in one line that names the versions (a checkpoint
    written before versions were recorded is version 1)."""
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["architecture"] == cg.ARCHITECTURE
    if architecture is None:
        del ckpt["architecture"]
    else:
        ckpt["architecture"] = architecture
    torch.save(ckpt, trained)
    expected = f"network version {architecture or 1}, whose blocks compute differently"
    for argv in (["sample", "--exp_name", "done"], ["train", "--exp_name", "done", "--resume"]):
        code, _, err = cli(capsys, *argv)
        one_line_error(code, err, expected)
    with pytest.raises(SystemExit) as e:
        fid.main(["--exp_name", "done", "--checkpoint", "last.pt", "--num_samples", "3", "--ref_images", "3"])
    one_line_error(e.value.code, capsys.readouterr().err, expected)


@pytest.mark.parametrize("failing", [1, 4])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(workdir, capsys, monkeypatch, failing):
    """torch.save reports a full disk as a RuntimeError raised over the OSError: one line, the previous
    checkpoint intact, and the way on: --resume, or before any checkpoint the same command again."""
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == failing:  # 4: last.pt at step 1, guide.pt (25% of 5 steps), last.pt at 2, full
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    code, _, err = cli(capsys, "train", "--exp_name", "full", *SMALL_RUN, "--max_steps", 5, "--ckpt_every", 1,
                       "--eval_every", 100)
    then = "resume with --resume" if failing > 1 else "run the same command again"
    one_line_error(code, err, f"No space left on device); the previous last.pt, if any, is intact; free some "
                              f"space, then {then}")
    saved = sorted(p.name for p in (workdir / "experiments/full/checkpoints").iterdir())
    assert saved == (["guide.pt", "last.pt"] if failing > 1 else [])
    assert failing == 1 or checkpoint("full")["step"] == 2


def test_sample_replaces_its_folder_whole(trained, capsys, monkeypatch):
    """`sample` writes into a .partial folder that replaces the old one when complete (its line says so): fewer samples
    than an earlier run leave no stale images, and Ctrl-C or a full disk midway leaves the old folder as
    it was, no .partial folder and no half-written PNG. Ctrl-C while the grid is written leaves no grid, rather
    than the old samples' grid beside the new samples."""
    samples = trained.parents[1] / "samples"
    folder = samples / "last_euler2_seed0"
    command = ["sample", "--exp_name", "done", "--num_sampling_steps", 2, "--batch_size", 3, "--precision", "fp32"]
    code, out, _ = cli(capsys, *command, "--num_samples", 6)
    assert code == 0 and "wrote 6 images to experiments/done/samples/last_euler2_seed0/ and a grid" in out
    six = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, _ = cli(capsys, *command, "--num_samples", 3)
    assert code == 0 and ("wrote 3 images to experiments/done/samples/last_euler2_seed0/ (in place of the 6 "
                          "images there before) and a grid") in out  # said, not silent
    three = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(three) == ["000000.png", "000001.png", "000002.png"]
    euler2 = lambda: sorted(p.name for p in samples.iterdir() if "euler2" in p.name)
    assert euler2() == ["last_euler2_seed0", "last_euler2_seed0.png"]  # the replaced folder is gone too
    assert all(six[name] == image for name, image in three.items())  # the same seed, the same images

    real_save, calls = Image.Image.save, []
    def save(image, path, *args, **kwargs):  # the 4th PNG: interrupted, or the disk fills while writing it
        calls.append(path)
        if len(calls) == 4:
            with open(path, "wb") as f:
                f.write(b"\x89PNG half")
            raise failure
        return real_save(image, path, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    for failure in (KeyboardInterrupt(), OSError(28, "No space left on device"), OSError(5, "Input/output error")):
        calls.clear()
        code, _, err = cli(capsys, *command, "--num_samples", 6)
        if isinstance(failure, KeyboardInterrupt):
            assert code == 130 and "interrupted after 3 of 6 images" in err and "is as it was" in err
        else:  # the fix names the samples' folder, not the .partial one, which is gone
            fix = "free some space" if failure.errno == 28 else "check that experiments/done/samples still"
            one_line_error(code, err, f"last_euler2_seed0.{os.getpid()}.partial/000003.png ({failure.strerror}); {fix}")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == three
        assert euler2() == ["last_euler2_seed0", "last_euler2_seed0.png"]

    def save_but_the_grid(image, path, *args, **kwargs):  # Ctrl-C as the grid is being written
        if Path(path).parent.name == "samples":
            raise KeyboardInterrupt
        return real_save(image, path, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save_but_the_grid)
    code, _, err = cli(capsys, *command, "--num_samples", 6)
    assert code == 130 and err == ("interrupted; experiments/done/samples/last_euler2_seed0/ holds all 6 images; "
                                   "last_euler2_seed0.png, their grid, was not written\n")
    assert len(list(folder.iterdir())) == 6 and euler2() == ["last_euler2_seed0"]  # not the grid of three
    # stopped while the replaced folder is deleted: the new images stand, the old are removed, no grid is drawn
    real_rmtree, interrupted = shutil.rmtree, []
    def rmtree_interrupted_once(path, **kwargs):  # Ctrl-C while the replaced folder is deleted
        if Path(path).name.endswith(".old") and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        real_rmtree(path, **kwargs)
    monkeypatch.setattr(Image.Image, "save", real_save)
    monkeypatch.setattr(shutil, "rmtree", rmtree_interrupted_once)
    code, _, err = cli(capsys, *command, "--num_samples", 3)
    assert code == 130 and err == ("interrupted; experiments/done/samples/last_euler2_seed0/ holds all 3 images; "
                                   "last_euler2_seed0.png, their grid, was not written\n")
    assert interrupted and len(list(folder.iterdir())) == 3 and euler2() == ["last_euler2_seed0"]


def test_samples_of_another_experiments_checkpoint_are_named_by_it(trained, capsys):
    """--checkpoint from another experiment's checkpoints/ (a relative or an absolute path) writes
    samples named by that experiment, not as this one's own; the experiment's own checkpoint given
    as a path keeps its plain name."""
    run = lambda exp, ckpt, *flags: cli(capsys, "sample", "--exp_name", exp, "--checkpoint", ckpt,
                                        "--num_sampling_steps", 1, *flags)[0]
    assert run("mine", trained, "--num_samples", 2) == 0
    assert run("mine", "experiments/done/checkpoints/last.pt", "--num_samples", 2, "--seed", 1) == 0
    assert run("mine", trained, "--grid") == run("done", trained, "--num_samples", 2) == 0
    assert sorted(p.name for p in (trained.parents[2] / "mine/samples").iterdir()) == [
        "done_last_euler1_seed0", "done_last_euler1_seed0.png", "done_last_euler1_seed1",
        "done_last_euler1_seed1.png", "done_last_grid_euler1_seed0.png"]
    assert (trained.parents[1] / "samples/last_euler1_seed0").is_dir()


def test_a_time_power_that_would_put_every_step_at_t_0_is_refused(trained, capsys):
    """t_i = 1 - (1 - i/S)^p: at p = 1e-300 every t_i < 1 rounds to 0, and multistep's slope would divide by
    t_i - t_(i-1) = 0: the flag's range ends at 0.1, in sample and in fid.py."""
    assert cg.time_grid(4, 1e-300)[:-1] == [0.0] * 4
    for code, err in [cli(capsys, "sample", "--exp_name", "done", "--time_power", "1e-300")[::2],
                      fid_error(capsys, "--exp_name", "done", "--time_power", "1e-300")]:
        one_line_error(code, err, "argument --time_power: must be >= 0.1, got 1e-300")


def test_a_time_power_that_would_start_a_step_at_t_1_in_float32_is_refused(trained, capsys, monkeypatch):
    """At 40 steps and p = 4.9 the last step starts at t = 1 - 40^-4.9 = 1 - 1.4e-8, which is 1 in
    the model's float32: the velocity (x_pred - x) / (1 - t) would divide by 0."""
    assert cg.torch.tensor(cg.time_grid(40, 4.5)[-2]) < 1  # 1 - 6.3e-8: below 1 in float32 too
    monkeypatch.setattr(fid, "inception", lambda *a: pytest.fail("fid.py began its slow work"))
    flags = ["--exp_name", "done", "--num_samples", 2, "--num_sampling_steps", 40, "--time_power", 4.9]
    for code, err in [cli(capsys, "sample", *flags)[::2], fid_error(capsys, *flags)]:
        one_line_error(code, err, "--time_power 4.9 at 40 steps starts a step at t = 1 in float32: lower "
                       "--time_power or --num_sampling_steps")


def test_grids_of_other_sizes_keep_their_own_files(trained, capsys):
    for cells in (4, 2, 4):  # 4: the default, named without its count; given again: the same file
        assert cli(capsys, "sample", "--exp_name", "done", "--grid", "--grid_samples", cells,
                   "--num_sampling_steps", 1)[0] == 0
    assert sorted(p.name for p in (trained.parents[1] / "samples").glob("last_grid*")) == [
        "last_grid2_euler1_seed0.png", "last_grid_euler1_seed0.png"]


@pytest.mark.parametrize("command", ["sample", "grid", "fid"])
def test_an_overflowing_guidance_weight_writes_no_black_images(trained, capsys, command, monkeypatch):
    """Autoguidance at w = 1e300 overflows float32 (x_guide + w (x_model - x_guide) is inf, then NaN):
    one line naming the weight, and no samples, grid or fid.json written."""
    monkeypatch.setattr(fid, "load_weights", lambda *a: fid.fid_inception().state_dict())
    monkeypatch.setattr(fid, "FIDFeatures", lambda state: FakeFeatures("x"))
    flags = ["--exp_name", "done", "--autoguidance", "1e300", "--num_sampling_steps", "2"]
    if command == "fid":
        code, err = fid_error(capsys, *flags, "--num_samples", 2, "--ref_images", 2)
    else:
        code, _, err = cli(capsys, "sample", *flags, *(["--grid"] if command == "grid" else ["--num_samples", 2]))
    one_line_error(code, err.splitlines()[-1] + "\n", "sampling gave images that are not finite (NaN or inf): a "
                   "guidance weight (--cfg_scale, --autoguidance) this large overflows")
    assert not list((trained.parents[1] / "samples").glob("last_*")) and not (trained.parents[1] / "fid.json").exists()


def sample_pngs(folder):
    """(N, H, W, 3): the PNGs `sample` wrote into folder, in their order."""
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_sample_is_autoguided_by_the_runs_guide_unless_told_otherwise(trained, capsys, no_weights):
    """By default sample guides by the run's guide.pt (its step-1 EMA) with weight AUTOGUIDANCE;
    --autoguidance 1 samples the model alone, as does a run without a guide.pt or the guide itself,
    which say so; the guide used is named, with its experiment when it was copied from another. A
    weight asked of a run without a guide (in sample and fid.py) or of a guide not earlier than the
    checkpoint, a guide of another model or whose weights do not fit it, or an unreadable one, is
    one line that names guide.pt."""
    samples, guide = trained.parents[1] / "samples", trained.parent / "guide.pt"
    sample = lambda *flags: cli(capsys, "sample", "--exp_name", "done", "--num_samples", 3,
                                "--num_sampling_steps", 3, *flags)
    shown = "experiments/done/checkpoints"
    code, out, err = sample()
    assert code == 0 and f"autoguidance {cg.AUTOGUIDANCE:g} by {shown}/guide.pt (step 1)\n" in out, err
    assert sample("--autoguidance", cg.AUTOGUIDANCE)[0] == sample("--autoguidance", 1)[0] == 0
    default = sample_pngs(samples / "last_euler3_seed0")
    assert np.array_equal(default, sample_pngs(samples / f"last_euler3_autoguidance{cg.AUTOGUIDANCE:g}_seed0"))
    assert not np.array_equal(default, sample_pngs(samples / "last_euler3_autoguidance1_seed0"))
    code, out, err = sample("--autoguidance", 2)  # a weight asked for is the one used
    assert code == 0 and f"autoguidance 2 by {shown}/guide.pt (step 1)\n" in out, err
    assert not np.array_equal(default, sample_pngs(samples / "last_euler3_autoguidance2_seed0"))
    foreign = torch.load(guide, weights_only=True)
    torch.save({**foreign, "args": {**foreign["args"], "exp_name": "other"}}, guide)  # copied in
    code, out, err = sample()
    assert code == 0 and f"by {shown}/guide.pt (step 1 of experiment other)" in out, err
    guide.rename(trained.parent / "kept.pt")
    code, out, err = sample()
    assert code == 0 and f"no {shown}/guide.pt: sampling without autoguidance" in out, err
    assert np.array_equal(sample_pngs(samples / "last_euler3_seed0"),
                          sample_pngs(samples / "last_euler3_autoguidance1_seed0"))
    one_line_error(*sample("--autoguidance", 2)[::2], f"--autoguidance 2 needs {shown}/guide.pt,")
    with pytest.raises(SystemExit) as stop:  # fid.py too, before its weights load (no_weights)
        fid.main(["--exp_name", "done", "--autoguidance", "2", "--num_samples", "3", "--ref_images", "3"])
    one_line_error(stop.value.code, capsys.readouterr().err, f"--autoguidance 2 needs {shown}/guide.pt,")
    foreign["args"]["image_size"] = 8
    torch.save(foreign, guide)
    one_line_error(*sample()[::2], f"{shown}/guide.pt is not of the model of {shown}/last.pt (other model, "
                   "image_size, patch_size, attributes): one of them is another run's; pass --autoguidance 1 to "
                   "sample last.pt without a guide")
    foreign["args"]["image_size"] = torch.load(trained, weights_only=True)["args"]["image_size"]
    foreign["ema"] = {k: v[:1] for k, v in foreign["ema"].items()}  # the model's, cut: unfit
    torch.save(foreign, guide)
    one_line_error(*sample()[::2], f"{shown}/guide.pt: the checkpoint's weights do not fit the model its "
                   "arguments describe")
    guide.write_bytes(b"not a checkpoint")
    one_line_error(*sample()[::2], "it guides sampling: pass --autoguidance 1 to sample without it")
    (trained.parent / "kept.pt").rename(guide)  # the run's own guide, sampled: it is not earlier
    code, out, err = sample("--checkpoint", "guide.pt")
    assert code == 0 and f"{shown}/guide.pt is the checkpoint being sampled (a model cannot" in out, err
    one_line_error(*sample("--checkpoint", "guide.pt", "--autoguidance", 2)[::2],
                   "guide.pt is the checkpoint being sampled (a model cannot guide itself), so "
                   "--autoguidance 2 has no guide; drop --autoguidance")
    torch.save({**torch.load(trained, weights_only=True), "step": 1}, trained)  # a run of one step
    code, out, err = sample()
    assert code == 0 and f"{shown}/guide.pt (step 1) is not earlier than {shown}/last.pt (step 1)" in out, err
    one_line_error(*sample("--autoguidance", 2)[::2], "(step 1) is not earlier than")


def test_the_checkpoint_is_the_model_and_guide_pt_its_guide(trained):
    """with_guide: x_guide + w (x_model - x_guide) with the sampled checkpoint's EMA as the model
    and guide.pt's (an earlier, different EMA) as the guide, not the other way round."""
    ckpt, guide = cg.load_checkpoint(trained), torch.load(trained.parent / "guide.pt", weights_only=True)
    guided = cg.with_guide(cg.load_model(ckpt, "cpu"), ckpt, trained, 2.0, "cpu")
    same = lambda net, state: all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert same(guided.model, ckpt["ema"]) and same(guided.guide, guide["ema"])
    assert not same(guided.model, guide["ema"])


def test_no_ema_samples_by_the_raw_weights_of_the_model_and_of_its_guide(trained, capsys):
    """A guide equal to the model changes nothing: x_g + w (x - x_g) = x. With guide.pt holding
    this checkpoint's EMA and raw weights, the default (EMA) samples and the --no_ema (raw) ones
    equal their unguided twins pixel for pixel, which a guide of the other kind would break. The
    raw weights' samples are named apart from the EMA's, and differ from them."""
    ckpt, guide = torch.load(trained, weights_only=True), trained.parent / "guide.pt"
    torch.save({**torch.load(guide, weights_only=True), "ema": ckpt["ema"], "model": ckpt["model"]},
               guide)
    samples = trained.parents[1] / "samples"
    for flags, suffix in [((), ""), (("--no_ema",), "_no_ema")]:
        for weight in [2, 1]:
            assert cli(capsys, "sample", "--exp_name", "done", "--num_samples", 3, "--num_sampling_steps", 3,
                       "--autoguidance", weight, *flags)[0] == 0
        assert np.array_equal(sample_pngs(samples / f"last_euler3_autoguidance2{suffix}_seed0"),
                              sample_pngs(samples / f"last_euler3_autoguidance1{suffix}_seed0"))
    assert not np.array_equal(sample_pngs(samples / "last_euler3_autoguidance1_seed0"),
                              sample_pngs(samples / "last_euler3_autoguidance1_no_ema_seed0"))


def test_a_denied_or_failing_write_or_read_is_one_line_naming_its_fix(trained, capsys, monkeypatch):
    """Permission denied is not a full disk, nor a corrupt file: the fix named is the permission. An
    I/O error (a lost mount, a failing disk) is none of these: it names the folder to look at. Any other
    error is left to its reason."""
    real_mkdir, failure = Path.mkdir, []
    def failing(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise failure[0]
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", failing)
    sample = lambda: cli(capsys, "sample", "--exp_name", "done", "--num_samples", 2, "--num_sampling_steps", 1)
    folder = "experiments/done/samples"
    for error, fix in [(PermissionError(13, "Permission denied"), f"make {folder} writable"),
                       (OSError(5, "Input/output error"), f"check that {folder} still exists and its disk works"),
                       (OSError(17, "File exists"), "remove the cause given in brackets")]:
        failure[:] = [error]
        one_line_error(*sample()[::2], f"cannot write into {folder} ({error.strerror}); {fix}")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    one_line_error(*sample()[::2], "checkpoint experiments/done/checkpoints/last.pt cannot be read (permission "
                                   "denied); give this user read access to it")


def test_a_flag_cut_short_or_a_missing_experiment_is_one_line(trained, capsys):
    """A typo that is the start of a real flag is not taken for that flag; an experiment that is not
    there is named as such, not as a missing last.pt."""
    sample = lambda *flags: cli(capsys, "sample", "--num_samples", 1, "--num_sampling_steps", 1, *flags)
    one_line_error(*sample("--exp_name", "done", "--autoguidanc", 2)[::2], "unrecognized arguments: --autoguidanc 2")
    one_line_error(*sample("--exp_name", "dnoe")[::2], "there is no experiment dnoe (experiments/dnoe does not exist)")
    (trained.parents[2] / "filey").write_text("not an experiment")
    one_line_error(*sample("--exp_name", "filey")[::2], "there is no experiment filey (experiments/filey is a file)")
    one_line_error(*sample("--exp_name", "done", "--checkpoint", "odd/gone.pt")[::2],
                   "checkpoint odd/gone.pt does not exist")  # the path as given, not under checkpoints/
    assert not list((trained.parents[1] / "samples").glob("last_euler1*"))


def test_a_folder_where_the_grid_goes_is_refused_before_sampling(trained, capsys, monkeypatch):
    (trained.parents[1] / "samples" / "last_grid_euler1_seed0.png").mkdir(parents=True)
    monkeypatch.setattr(cg, "guidance_grid", lambda *args: pytest.fail("sampled before the check"))
    code, _, err = cli(capsys, "sample", "--exp_name", "done", "--grid", "--num_sampling_steps", 1)
    one_line_error(code, err, "last_grid_euler1_seed0.png is a folder, where the grid goes; move it away")
    (trained.parents[1] / "samples" / "last_euler1_seed0.png").mkdir()  # and where the samples' grid goes
    code, _, err = cli(capsys, "sample", "--exp_name", "done", "--num_samples", 1, "--num_sampling_steps", 1)
    one_line_error(code, err, "last_euler1_seed0.png is a folder, where the samples' grid goes; move it away")
    assert not list((trained.parents[1] / "samples").glob("last_euler1_seed0.*partial"))


@pytest.mark.parametrize("flags,named", [
    (["--cfg_scale", 2], "--cfg_scale"), (["--attributes", "Smiling=1"], "--attributes"),
    (["--attributes", "Smiling=1", "--cfg_scale", 2], "--attributes or --cfg_scale")])
def test_a_request_of_an_unconditional_checkpoint_names_the_flags_given(trained, capsys, flags, named):
    code, _, err = cli(capsys, "sample", "--exp_name", "done", "--num_samples", 1, *flags)
    one_line_error(code, err, "trained without --attributes: it draws random faces")
    assert err.strip().endswith(f"takes no {named}"), err


def test_a_full_disk_at_a_sample_grid_is_one_line_and_the_run_resumes(workdir, capsys, monkeypatch):
    def full(image, path, *args, **kwargs):  # PNG files; TensorBoard's in-memory PNGs still work
        if not isinstance(path, os.PathLike):
            return real_save(image, path, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = cli(capsys, "train", "--exp_name", "grid", *SMALL_RUN, "--max_steps", 4, "--ckpt_every", 1,
                       "--sample_every", 2, "--eval_every", 100)
    one_line_error(code, err, "step_0000002.png (No space left on device); free some space, then resume with "
                   "--resume")
    # last.pt is saved before the grid: the step whose grid failed is not lost
    assert checkpoint("grid")["step"] == 2 and not list((workdir / "experiments/grid/samples").iterdir())
    # before the first checkpoint (guide.pt: at step 2 of 8), the fix is the same command
    first = ["train", "--exp_name", "early", *SMALL_RUN, "--max_steps", 8, "--sample_every", 1, "--eval_every", 100]
    code, _, err = cli(capsys, *first)
    one_line_error(code, err, "step_0000001.png (No space left on device); free some space, then run the same "
                   "command again")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert cli(capsys, *first)[0] == 0 and checkpoint("early")["step"] == 8
    assert cli(capsys, "train", "--exp_name", "grid", "--resume")[0] == 0
    assert checkpoint("grid")["step"] == 4

    def interrupted(image, path, *args, **kwargs):  # a second Ctrl-C while a PNG is being written
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cg.save_png(torch.zeros(3, 2, 2), workdir / "grid.png")
    assert not list(workdir.glob("grid.png*"))


def test_a_resume_rewrites_args_json_and_names_a_checkpoint_of_another_experiment(trained, capsys):
    exp = trained.parents[1]
    assert json.loads((exp / "args.json").read_text())["max_steps"] == 2
    code, out, _ = cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 3, "--lr", 1e-3)
    assert code == 0 and "resuming with changed flags: --max_steps 2 -> 3\n" in out  # --lr 1e-3: the run's
    assert json.loads((exp / "args.json").read_text())["max_steps"] == 3
    assert not list(exp.glob("*.tmp"))
    before = (exp / "args.json").read_text()
    code, out, _ = cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 2, "--lr", 0.5)
    assert code == 0 and "already at step 3 of 2; raise --max_steps to train further" in out
    assert (exp / "args.json").read_text() == before
    copied = exp.parent / "copy" / "checkpoints"
    copied.mkdir(parents=True)
    shutil.copy(trained, copied / "last.pt")
    code, out, _ = cli(capsys, "train", "--exp_name", "copy", "--resume", "--max_steps", 4)
    assert code == 0 and "resuming copy from step 3 (last.pt, saved by experiment done)" in out
    code, out, _ = cli(capsys, "train", "--exp_name", "copy", "--resume", "--max_steps", 5, "--ema_decay", 0.99)
    assert code == 0 and "resuming copy from step 4 (last.pt)\n" in out
    assert "resuming with changed flags: --max_steps 4 -> 5, --ema_decay 0.995 -> 0.99\n" in out
    code, out, _ = cli(capsys, "train", "--exp_name", "copy", "--resume", "--max_steps", 5)
    assert code == 0 and "already at step 5 of 5" in out and "changed flags" not in out
    shutil.copytree(exp.parent / "copy", exp.parent / "renamed")  # a whole experiment: resumes
    with pytest.MonkeyPatch.context() as patch:  # even after a resume that failed before saving
        patch.setattr(cg, "flow_loss", lambda *a: (_ for _ in ()).throw(cg.UserError("failed")))
        assert cli(capsys, "train", "--exp_name", "renamed", "--resume", "--max_steps", 6)[0] == 2
    assert json.loads((exp.parent / "renamed" / "args.json").read_text())["exp_name"] == "renamed"
    code, out, _ = cli(capsys, "train", "--exp_name", "renamed", "--resume", "--max_steps", 6)
    assert code == 0 and "resuming renamed from step 5 (last.pt, saved by experiment copy)" in out


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # its traceback
@pytest.mark.parametrize("records", [0, 2])  # the disk is full from the first record, or the third
def test_a_disk_that_refuses_the_tensorboard_logs_stops_them_not_the_run(workdir, capsys, monkeypatch,
                                                                        records):
    from tensorboard.summary.writer import record_writer
    write, written = record_writer.RecordWriter.write, []

    def full(self, data):  # in TensorBoard's writer thread; the next write in the run raises it again
        if len(written) == records:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(write(self, data))
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    code, _, err = cli(capsys, "train", "--exp_name", "logs", *SMALL_RUN, "--max_steps", 3, "--log_every", 1)
    assert code == 0 and err == ("cannot write the TensorBoard logs in experiments/logs/logs (No space left "
                                 "on device); training goes on without them\n")
    assert cg.load_checkpoint(workdir / "experiments/logs/checkpoints/last.pt")["step"] == 3


def test_a_checkpoint_copied_over_another_runs_files_is_refused(trained, capsys):
    other = trained.parents[2] / "other"
    assert cli(capsys, "train", "--exp_name", "other", *SMALL_RUN, "--max_steps", 1, "--seed", 3)[0] == 0
    shutil.copy(trained, other / "checkpoints" / "last.pt")  # over the run of args.json
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "train", "--exp_name", "other", "--resume", "--max_steps", 4)
    one_line_error(code, err, "checkpoints/last.pt is of another run than experiments/other/args.json (run_id ")
    assert ", seed 0 vs 3): a resume would overwrite that run's files" in err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("grid", [[], ["--grid"]])
def test_sample_on_a_read_only_disk_fails_before_it_samples(trained, capsys, monkeypatch, grid):
    monkeypatch.setattr(cg.tempfile, "TemporaryFile", lambda **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    monkeypatch.setattr(cg, "sample", lambda *a, **k: pytest.fail("sampled first"))
    code, _, err = cli(capsys, "sample", "--exp_name", "done", "--num_sampling_steps", 1, *grid)
    one_line_error(code, err, "cannot write in experiments/done/samples (Read-only file system); make "
                   "experiments/done/samples writable, then run the command again")


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sigterm_while_sampling_ends_as_ctrl_c_does(trained, stop):
    """SIGTERM (kill, timeout) or SIGHUP (the terminal closed) to `sample`: one line, status 130,
    and no half-written folder."""
    run = subprocess.Popen([sys.executable, str(ROOT / "celebgen.py"), "sample", "--exp_name", "done",
                            "--num_samples", "2000", "--batch_size", "1", "--num_sampling_steps", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:
        if line.startswith("sampled 2/"):
            break
    run.send_signal(getattr(signal, stop))
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and err.count("\n") == 1 and err.startswith("interrupted after "), err
    assert "of 2000 images; experiments/done/samples/last_euler2_seed0/ was not made" in err
    assert not list((trained.parents[1] / "samples").glob("last_*"))


def test_a_second_ctrl_c_while_a_checkpoint_is_written_is_a_ctrl_c(tmp_path, monkeypatch):
    """Ctrl-C inside torch.save's writer surfaces as its RuntimeError ("unexpected pos") over the
    KeyboardInterrupt: it stays a Ctrl-C (one line, status 130), and the previous file is intact."""
    def interrupted(state, f):
        f.write(b"half a checkpoint")
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 52")
    cg.save_checkpoint(tmp_path / "last.pt", {"step": 1})
    monkeypatch.setattr(cg.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cg.save_checkpoint(tmp_path / "last.pt", {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"step": 1}


def test_training_s_own_sigterm_handler_is_not_replaced_by_a_nested_command(capsys):
    """Under torchrun, train_loop runs through exit_on_user_error inside InterruptRequest: SIGTERM
    stays a request to stop after the step, not a KeyboardInterrupt in the middle of one."""
    with cg.InterruptRequest(announce=False) as interrupt:
        cg.exit_on_user_error(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(0.2))
    assert interrupt.requested


def test_args_json_that_cannot_be_written_stops_no_run(workdir, capsys, monkeypatch):
    real_write = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")) if self.name.startswith("args.json.") else
        real_write(self, *a, **k))
    code, _, err = cli(capsys, "train", "--exp_name", "full", *SMALL_RUN, "--max_steps", 2)
    assert code == 0 and checkpoint("full")["step"] == 2, err
    assert "cannot write experiments/full/args.json (No space left on device); training goes on" in err


def test_two_processes_writing_one_file_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    """Two fid.py runs may finish together: each writes its own temporary file, and the file is
    whole, the last writer's, with nothing left beside it."""
    path = tmp_path / "fid.json"
    monkeypatch.setattr(cg.os, "getpid", lambda: 101)
    with cg.written_whole(path) as first:
        first.write_text("first")
        monkeypatch.setattr(cg.os, "getpid", lambda: 102)
        with cg.written_whole(path) as second:
            second.write_text("second")
        assert path.read_text() == "second"
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["fid.json"]


def test_checkpoints_are_synced_and_a_stale_temporary_file_is_removed(trained, capsys, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or
                        real_fsync(fd))
    assert cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 3)[0] == 0
    assert checkpoint("done")["step"] == 3
    tmp = trained.with_name(f"last.pt.{os.getpid()}.tmp")
    assert str(tmp) in synced and str(trained.parent) in synced  # the file, then the folder's rename
    tmp = trained.with_name("last.pt.12345.tmp")  # a process's that was killed
    tmp.write_bytes(b"half a checkpoint, from a kill mid-save")
    logs = files_under(trained.parents[1] / "logs")
    code, out, _ = cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 3)  # nothing to do
    assert code == 0 and "already at step 3" in out and not tmp.exists()
    assert files_under(trained.parents[1] / "logs") == logs  # and no empty TensorBoard file


# --- fid.py -----------------------------------------------------------------------------------------------

@pytest.fixture
def no_weights(monkeypatch):
    """fid.py must refuse bad input before it loads the Inception weights: loading them fails the test."""
    monkeypatch.setattr(fid, "load_weights", lambda *a: pytest.fail("the weights were loaded before the check"))


def png_folder(folder, sizes):
    folder.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        Image.fromarray(np.full((size, size, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_a_quoted_tilde_is_named_as_the_likely_cause_of_a_missing_path(workdir, capsys):
    """"~/x" in quotes reaches the program unexpanded: each missing-path line says so."""
    tilde = "does not exist (a ~ in quotes is not your home: leave it unquoted, or write the full path)"
    one_line_error(*cli(capsys, "train", "--exp_name", "x", *TOY, "--dataset", "celeba", "--data_root",
                        "~/data")[::2], f"--data_root ~/data {tilde}")
    one_line_error(*cli(capsys, "sample", "--exp_name", "x", "--checkpoint", "~/last.pt")[::2],
                   f"checkpoint ~/last.pt {tilde}")
    one_line_error(*fid_error(capsys, "~/samples", "~/stats.npz"), f"~/samples {tilde}")
    one_line_error(*cli(capsys, "train", "--exp_name", "x", *TOY, "--dataset", "celeba", "--data_root",
                        "nowhere")[::2], "--data_root nowhere does not exist; ")


def fid_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        fid.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("one_image", "holds 1 images with a lower-case extension"),
    ("missing", "missing does not exist"),
    ("a_file", "is a file, not a folder"),
    ("missing.npz", "missing.npz does not exist; give two folders of images or two .npz files"),
    ("images.npz", "images.npz is a folder, and a name ending in .npz is read as statistics; rename"),
    ("no_mu.npz", "is not an .npz of FID statistics with arrays mu and sigma"),
    ("one_array.npz", "is not an .npz of FID statistics with arrays mu and sigma"),
])
def test_fid_refuses_bad_paths_before_loading_weights(workdir, capsys, no_weights, case, message):
    png_folder(workdir / "one_image", [16])
    png_folder(workdir / "good", [16, 16])
    png_folder(workdir / "images.npz", [16, 16])
    (workdir / "a_file").write_text("x")
    np.savez(workdir / "no_mu.npz", mean=np.zeros(3))
    with open(workdir / "one_array.npz", "wb") as f:  # np.save's .npy format, named .npz
        np.save(f, np.zeros(3))
    one_line_error(*fid_error(capsys, "good", case), message)


def test_fid_of_statistics_of_different_dimension(workdir, capsys, no_weights):
    np.savez(workdir / "a.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(workdir / "b.npz", mu=np.zeros(4), sigma=np.eye(4))
    one_line_error(*fid_error(capsys, "a.npz", "b.npz"), "features of different dimensions (3 and 4)")


def test_fid_statistics_need_two_images():
    with pytest.raises(cg.UserError, match="at least 2 images per side, got 1"):
        stats = fid.RunningStatistics()
        stats.add(np.ones((1, 2048)))
        stats.mean_and_covariance()


def test_fid_folder_of_mixed_sizes_or_a_corrupt_image(workdir, capsys, monkeypatch):
    monkeypatch.setattr(fid, "load_weights", lambda *a: fid.fid_inception().state_dict())
    png_folder(workdir / "good", [16, 16])
    png_folder(workdir / "mixed", [16, 24])
    one_line_error(*fid_error(capsys, "good", "mixed"), "001.png is 24x24 but 000.png is 16x16")
    png_folder(workdir / "corrupt", [16, 16])
    (workdir / "corrupt" / "002.png").write_bytes(b"not a png")
    one_line_error(*fid_error(capsys, "good", "corrupt"), "cannot read image corrupt/002.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x16 images: over twice the limit
    one_line_error(*fid_error(capsys, "good", "good"), "cannot read image good/000.png")


def test_fid_names_an_image_cut_short_before_loading_inception(workdir, capsys, monkeypatch):
    def no_inception(*args):
        raise AssertionError("Inception loaded before every image was read")
    monkeypatch.setattr(fid, "load_weights", no_inception)
    png_folder(workdir / "good", [16, 16])
    cut = png_folder(workdir / "cut", [16, 16, 16])
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(cut / "001.png")
    (cut / "001.png").write_bytes((cut / "001.png").read_bytes()[:300])  # of about 800
    with Image.open(cut / "001.png") as img:
        assert img.size == (16, 16)  # its header is whole: only decoding finds the cut
    one_line_error(*fid_error(capsys, "good", "cut"), "cannot read image cut/001.png")


def test_fid_reads_exactly_the_files_pytorch_fid_reads(workdir):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    folder = png_folder(workdir / "f", [8, 8, 8])
    (folder / "000.png").rename(folder / "upper.PNG")
    (folder / "notes.txt").write_text("x")
    Image.new("RGB", (8, 8)).save(folder / "photo.jpg")
    theirs = sorted(file for ext in fid_score.IMAGE_EXTENSIONS for file in folder.glob(f"*.{ext}"))
    assert fid.folder_files(folder) == theirs == [folder / "001.png", folder / "002.png", folder / "photo.jpg"]


def test_fid_says_when_it_adds_eps_to_the_covariances(capsys, monkeypatch):
    """A product of covariances whose root is not finite is taken again with eps added to each
    covariance's diagonal, as pytorch-fid does: sqrtm((S1 + eps I)(S2 + eps I))."""
    real_sqrtm, calls = fid.scipy.linalg.sqrtm, []
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: calls.append(a) or
                        (np.full_like(a, np.nan) if len(calls) % 2 else real_sqrtm(a)))  # 1st, 3rd
    eye = np.eye(3)
    assert fid.frechet_distance(np.zeros(3), eye, np.zeros(3), eye) == pytest.approx(0, abs=1e-5)
    assert "adding 1e-06 to their diagonals" in capsys.readouterr().err and len(calls) == 2
    a, b = (np.random.default_rng(seed).standard_normal((3, 2)) for seed in (0, 1))
    s1, s2 = a @ a.T, b @ b.T  # rank 2 of 3: singular
    fid.frechet_distance(np.zeros(3), s1, np.zeros(3), s2, eps=0.01)
    assert np.allclose(calls[3], (s1 + 0.01 * eye) @ (s2 + 0.01 * eye), rtol=0, atol=1e-12)


def test_reference_images_are_held_out_distinct_and_read_only_as_needed(workdir, monkeypatch):
    val, test = cg.make_dataset(TOY_ARGS, "val"), cg.make_dataset(TOY_ARGS, "test")
    assert not torch.equal(val[0], test[0])  # toy val and test are different images
    random_image_folder(workdir / "plain", 4)
    plain = cg.argparse.Namespace(**{**vars(TOY_ARGS), "dataset": "celeba", "data_root": "plain"})
    args = cg.argparse.Namespace(ref_split="heldout", ref_images=3, batch_size=2, exp_name="x",
                                 ref_images_given=True)
    with pytest.raises(cg.UserError, match="has no split file, so its heldout images are its training images"):
        fid.check_references(plain, args, Path("fid.json"))  # before the weights load: fid.py checks its references first

    reads, real_getitem = [], cg.ToyFaces.__getitem__
    monkeypatch.setattr(cg.ToyFaces, "__getitem__", lambda self, i: reads.append(i) or real_getitem(self, i))
    model = FakeFeatures("weights-a")
    fid.reference_statistics(TOY_ARGS, model, args, "cpu")
    assert len(reads) == 3  # of the 100,000 val + test images, only the 3 used are drawn
    fid.reference_statistics(TOY_ARGS, FakeFeatures("weights-b"), args, "cpu")
    assert len(list((workdir / "experiments/fid_refs").iterdir())) == 2  # one cache file per weights



def test_a_cached_reference_of_other_features_is_refused_in_one_line(trained, capsys, monkeypatch):
    monkeypatch.setattr(fid, "load_weights", lambda *a: fid.fid_inception().state_dict())
    monkeypatch.setattr(fid, "FIDFeatures", lambda state: FakeFeatures("x"))  # 8 features
    monkeypatch.setattr(fid, "reference_statistics", lambda *a: {  # a cache of 3
        "mu": np.zeros(3), "sigma": np.eye(3), "features": np.ones((4, 3)), "count": 4, "path": Path("c.npz")})
    code, err = fid_error(capsys, "--exp_name", "done", "--num_samples", 3, "--ref_images", 3,
                          "--num_sampling_steps", 1, "--autoguidance", 1)
    one_line_error(code, err.splitlines()[-1] + "\n", "c.npz holds statistics of 3 features, the samples have 8: "
                   "delete it")  # after the progress and the small-count warning


def test_a_cached_reference_without_features_is_refused_in_one_line(workdir):
    """KID needs the reference features: a cache that lost them is named, not a late traceback."""
    args = cg.argparse.Namespace(ref_split="heldout", ref_images=3, batch_size=2, exp_name="x",
                                 ref_images_given=True)
    fid.reference_statistics(TOY_ARGS, FakeFeatures("weights-a"), args, "cpu")
    (cache,) = (workdir / "experiments/fid_refs").iterdir()
    with np.load(cache) as stats:
        saved = dict(stats)
    for features, message in ((None, "holds no features, which KID needs: delete"),  # pytorch-fid's keys only
                              (saved["features"][:1], r"holds features of 1 image\(s\), and KID needs 2 or more")):
        np.savez(cache, **{**saved, "features": features} if features is not None else
                 {k: saved[k] for k in ("mu", "sigma")})
        with pytest.raises(cg.UserError, match=message):
            fid.reference_statistics(TOY_ARGS, FakeFeatures("weights-a"), args, "cpu")


TOY_ARGS = cg.argparse.Namespace(dataset="toy", image_size=16, data_root=None, attributes=[])


class FakeFeatures(torch.nn.Module):
    """Stands in for the Inception network: 8 features per image, and a fingerprint naming its weights."""

    def __init__(self, fingerprint):
        super().__init__()
        self.fingerprint, self.classifier = fingerprint, torch.nn.Linear(8, 4)

    def forward(self, images):
        return images.flatten(1)[:, :8], images.flatten(1)[:, :4]


def test_fid_of_another_experiment_s_checkpoint_is_named_after_it(workdir, capsys, monkeypatch, trained):
    """--checkpoint PATH of experiment done under --exp_name new (which need not exist yet): the number is
    printed and written as new's fid_done_last.json, never as new's own fid.json or in new's logs."""
    monkeypatch.setattr(fid, "load_weights", lambda *a: fid.fid_inception().state_dict())
    monkeypatch.setattr(fid, "FIDFeatures", lambda state: FakeFeatures("x"))
    fid.main(["--exp_name", "new", "--checkpoint", str(trained), "--num_samples", "3", "--ref_images", "3",
              "--num_sampling_steps", "1", "--batch_size", "3"])
    result = json.loads((workdir / "experiments/new/fid_done_last.json").read_text())
    assert f'"fid": {result["fid"]}' in capsys.readouterr().out and result["checkpoint"] == str(trained)
    assert files_under(workdir / "experiments/new") == ["fid_done_last.json"]


def test_fid_into_a_read_only_experiment_is_refused_before_the_slow_steps(trained, capsys, monkeypatch):
    real = cg.tempfile.TemporaryFile
    monkeypatch.setattr(cg.tempfile, "TemporaryFile", lambda dir, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")) if dir == Path("experiments/done") else real(dir=dir, **k))
    monkeypatch.setattr(fid, "inception", lambda *a: pytest.fail("the Inception weights loaded"))
    code, err = fid_error(capsys, "--exp_name", "done", "--num_samples", "3", "--ref_images", "3")
    one_line_error(code, err, "cannot write in experiments/done (Read-only file system); make experiments/done "
                   "writable, then run the command again")


def test_fid_of_a_run_whose_images_are_not_here_names_the_run_s_data_root(workdir, capsys, trained, no_weights):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["args"].update(dataset="celeba", data_root="moved_away")
    torch.save(ckpt, workdir / "moved.pt")
    code, err = fid_error(capsys, "--exp_name", "moved", "--checkpoint", workdir / "moved.pt")
    one_line_error(code, err, "the run trained on --data_root moved_away, which is not a folder here, and its real "
                   "images are the references; run fid.py where the run was trained, or compare two folders")


def test_fid_reads_the_run_s_images_and_never_downloads_them(workdir, capsys, trained, monkeypatch):
    """A run trained with --download: fid.py reads its images where they are, with no fetch."""
    random_image_folder(workdir / "images", 6)
    ckpt = torch.load(trained, weights_only=True)
    ckpt["args"].update(dataset="celeba", data_root="images", download=True)
    torch.save(ckpt, workdir / "downloaded.pt")
    monkeypatch.setattr(cg, "download_celeba", lambda root: pytest.fail("fid.py downloaded CelebA"))
    monkeypatch.setattr(fid, "inception", lambda *a: sys.exit("checked"))  # the first slow step
    with pytest.raises(SystemExit, match="checked"):
        fid.main(["--exp_name", "downloaded", "--checkpoint", str(workdir / "downloaded.pt"),
                  "--ref_split", "train", "--ref_images", "6"])


def test_fid_that_cannot_write_prints_its_result_and_one_line(workdir, capsys, monkeypatch, trained):
    """A full disk at the reference cache is a line, and the run goes on; a read-only experiment at
    fid.json is one error line after the result, which is printed first."""
    monkeypatch.setattr(fid, "load_weights", lambda *a: fid.fid_inception().state_dict())
    monkeypatch.setattr(fid, "FIDFeatures", lambda state: FakeFeatures("x"))
    monkeypatch.setattr(fid.np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    real_write = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")) if self.name.startswith("fid.json.") else real_write(self, *a, **k))
    with pytest.raises(SystemExit) as e:
        fid.main(["--exp_name", "done", "--num_samples", "3", "--ref_images", "3", "--num_sampling_steps", "1",
                  "--batch_size", "3", "--autoguidance", "1"])
    out, err = capsys.readouterr()
    assert '"fid":' in out and "cannot cache the reference statistics in experiments/fid_refs (No space" in err
    one_line_error(e.value.code, err.splitlines()[-1] + "\n", "cannot write experiments/done/fid.json (Read-only "
                   "file system); the result is printed above; make experiments/done writable to keep it there")
    assert not list((workdir / "experiments").rglob("*.tmp")) and not list((workdir / "experiments").rglob("*.npz"))


@pytest.mark.parametrize("cut", ["full_disk", "ctrl_c"])
def test_a_lock_cut_short_is_not_left_behind(trained, capsys, monkeypatch, cut):
    class FullDisk:  # created, but its text never reaches the disk
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def write(self, text):
            if cut == "ctrl_c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        def __exit__(self, *exc):
            self.f.close()
    real_open = open
    with monkeypatch.context() as patch:
        patch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullDisk(real_open(path, mode))
                      if str(path).endswith("train.lock") else real_open(path, mode, *a, **k))
        code, _, err = cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 3)
    if cut == "ctrl_c":
        assert code == 130 and err.startswith("interrupted") and err.count("\n") == 1, err
    else:
        one_line_error(code, err, "cannot write experiments/done/train.lock (No space left on device); free some")
    assert not (trained.parents[1] / "train.lock").exists()
    assert cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 3)[0] == 0


def test_a_new_experiment_on_a_read_only_disk_is_one_line(workdir, capsys, monkeypatch):
    real_mkdir = Path.mkdir
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")) if "experiments" in str(self) else real_mkdir(self, *a, **k))
    code, _, err = cli(capsys, "train", "--exp_name", "new", *SMALL_RUN, "--max_steps", 1)
    one_line_error(code, err, "cannot write experiments/new/train.lock (Read-only file system); make . writable")


def test_a_read_only_experiment_is_one_line_at_its_lock(trained, capsys, monkeypatch):
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")) if str(path).endswith("train.lock") else
        real_open(path, mode, *a, **k))
    code, _, err = cli(capsys, "train", "--exp_name", "done", "--resume", "--max_steps", 3)
    one_line_error(code, err, "cannot write experiments/done/train.lock (Read-only file system); make "
                              "experiments/done writable")


def test_a_value_with_a_dot_keeps_its_grid_beside_its_folder(trained, capsys):
    """Sample names hold flag values such as 1.5: each grid is its folder's name + .png, not cut at a dot;
    and every digit, so that a value near another (1.2500001) does not replace its samples."""
    for power in (1.5, 1.25, 1.2500001, 2.0):
        assert cli(capsys, "sample", "--exp_name", "done", "--num_samples", 2, "--num_sampling_steps", 1,
                   "--time_power", power)[0] == 0
    assert sorted(p.name for p in (trained.parents[1] / "samples").glob("last_*")) == [
        "last_euler1_power1.2500001_seed0", "last_euler1_power1.2500001_seed0.png", "last_euler1_power1.25_seed0",
        "last_euler1_power1.25_seed0.png", "last_euler1_power1.5_seed0", "last_euler1_power1.5_seed0.png",
        "last_euler1_power2_seed0", "last_euler1_power2_seed0.png"]
    (trained.parents[1] / "samples" / "last_euler1_power1.75_seed0.png").mkdir()  # checked whole too
    one_line_error(*cli(capsys, "sample", "--exp_name", "done", "--num_samples", 2, "--num_sampling_steps", 1,
                        "--time_power", 1.75)[::2], "power1.75_seed0.png is a folder, where the samples' grid goes")


@pytest.mark.parametrize("argv,expected", [
    (["--exp_name", "done", "--cfg_scale", "0", "1"], "--exp_name takes no paths, and 1 was read as one: give "
                                                       "either --exp_name or two paths, and one value per flag"),
    ([], "give either --exp_name or exactly two paths"), (["a"], "give either --exp_name or exactly two paths"),
    (["a", "b", "--exp_name", "done"], "--exp_name takes no paths, and a b were read as paths: give either"),
    (["a", "b", "--num_samples", "10", "--cfg_scale", "3"], "--num_samples, --cfg_scale apply to an experiment's "
                                                           "samples (--exp_name); two paths are compared as they are")])
def test_fid_is_asked_for_an_experiment_or_two_paths(workdir, capsys, no_weights, argv, expected):
    """A second value of a one-value flag (sample takes several --cfg_scale) reads as a path: said so."""
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    one_line_error(e.value.code, capsys.readouterr().err, expected)
