"""Checks before work, one writer per experiment, and a dead DDP worker explained: what a run does
when its input makes no sense, when the file system is not what it expects, when a second `train`
starts on the same experiment, and when the operating system kills one of its processes."""
import contextlib
import multiprocessing
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch

import celebgen as cg
import fid
from conftest import ROOT
from test_failures import SMALL_RUN, fid_error, no_weights, one_line_error  # noqa: F401
from test_training import checkpoint, cli


# --- every numeric flag says its range, and the parser enforces exactly that range ---------------

def numeric_flags():
    """(program, flag, its type) of every numeric flag of celebgen.py's train and sample and of
    fid.py."""
    parser, _ = cg.make_parser()
    commands = parser._subparsers._group_actions[0].choices
    parsers = [(f"celebgen.py {name}", p) for name, p in commands.items()]
    parsers.append(("fid.py", fid.make_parser()))
    return [(program, action.option_strings[0], action)
            for program, p in parsers for action in p._actions if hasattr(action.type, "valid")]


def test_every_help_page_renders():
    """argparse expands % in each flag's help: a stray one breaks --help, to which every error of
    a flag points. Each flag's default is shown, except None, a list or a switch's True or False,
    which mean nothing to a reader or mislead (--no_pair_noise's True is pairing on)."""
    parser = cg.make_parser()[0]
    pages = [parser, *parser._subparsers._group_actions[0].choices.values(), fid.make_parser()]
    for p in pages:
        shown = " ".join(p.format_help().split())
        assert "--" in shown and not re.search(r"\(default: (None|True|False|\[)", shown)
    assert not any("loss scaling" in " ".join(p.format_help().split()) for p in (pages[2], pages[-1]))
    assert "(default: ./data)" in " ".join(" ".join(p.format_help().split()) for p in pages)


def test_every_number_flag_is_bounded():
    flags = {flag for _, flag, _ in numeric_flags()}
    assert {"--t_eps", "--cooldown", "--lr", "--ema_decay", "--num_samples", "--ref_images",
            "--batch_size", "--cfg_scale"} <= flags and len(flags) >= 25


@pytest.mark.parametrize("program,flag,action", numeric_flags(), ids=lambda x: str(x))
def test_a_numeric_flag_states_its_range_and_the_parser_enforces_it(program, flag, action):
    """The help ends with the range in words; each bound it names is enforced exactly: a value
    just inside passes, the bound itself or a value just outside is refused, and so are nan, inf
    and text."""
    valid = action.type.valid
    assert action.help.endswith(f"({valid})")
    step = 1 if valid.startswith("an integer") else 1e-6
    for text in ("nan", "inf", "-inf", "ten"):
        with pytest.raises(Exception):
            action.type(text)
    for sign, bound in re.findall(r"(>=|>|<) (\S+)", valid):
        bound = float(bound)
        inside = {">": bound + step, ">=": bound, "<": bound - step}[sign]
        outside = {">": bound, ">=": bound - step, "<": bound}[sign]
        action.type(str(int(inside) if step == 1 else inside))
        with pytest.raises(Exception, match="must be"):
            action.type(str(int(outside) if step == 1 else outside))


def test_t_eps_is_a_cap_inside_the_time_axis(workdir, capsys):
    for value in (1, 1.5):
        code, _, err = cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--t_eps", value,
                           "--max_steps", 1)
        one_line_error(code, err, f"argument --t_eps: must be < 1, got {value}")
    assert not (workdir / "experiments").exists()


# --- a file where a folder goes (or the reverse), and damaged statistics: one line, before work --

@pytest.mark.parametrize("blocker,message", [
    ("experiments", "experiments is a file, where celebgen keeps a folder"),
    ("experiments/e", "experiments/e is a file, where celebgen keeps a folder"),
    ("experiments/e/checkpoints", "experiments/e/checkpoints is a file, where celebgen keeps"),
    ("experiments/e/logs", "experiments/e/logs is a file, where celebgen keeps a folder"),
    ("experiments/e/args.json/", "experiments/e/args.json is a folder, where the run's arguments"),
])
def test_train_refuses_a_file_system_in_the_way_before_any_work(workdir, capsys, blocker,
                                                                 message):
    path = workdir / blocker.rstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if blocker.endswith("/") else path.write_text("not a folder")
    before = sorted(str(p) for p in workdir.rglob("*"))
    code, out, err = cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 2)
    one_line_error(code, err, message)
    assert "device" not in out and sorted(str(p) for p in workdir.rglob("*")) == before


def test_sample_refuses_a_file_where_its_images_go_before_sampling(workdir, capsys, monkeypatch):
    assert cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 1)[0] == 0
    monkeypatch.setattr(cg, "sample", lambda *a, **k: pytest.fail("sampled before the check"))
    (workdir / "experiments/e/samples/last_euler2_seed0").write_text("a file")
    code, _, err = cli(capsys, "sample", "--exp_name", "e", "--num_sampling_steps", 2)
    one_line_error(code, err, "last_euler2_seed0 is a file, where the samples go")
    (workdir / "experiments/e/samples/last_euler2_seed0").unlink()
    (workdir / "experiments/e/logs").rename(workdir / "experiments/e/logs_")
    (workdir / "experiments/e/logs").write_text("a file")
    code, _, err = cli(capsys, "sample", "--exp_name", "e", "--grid")
    one_line_error(code, err, "experiments/e/logs is a file, where celebgen keeps a folder")


@pytest.mark.parametrize("case,message", [
    ("one_sample", "argument --num_samples: must be >= 2, got 1"),
    ("too_many_refs", "--ref_images 200000 is more than the 100000 images of --ref_split"),
    ("refs_folder_is_a_file", "experiments/fid_refs is a file, where celebgen keeps a folder"),
    ("fid_json_is_a_folder", "experiments/e/fid.json is a folder, where fid.py's result goes"),
])
def test_fid_refuses_what_it_cannot_do_before_loading_weights(workdir, capsys, no_weights, case,
                                                              message):
    assert cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 1)[0] == 0
    argv = ["--exp_name", "e", "--num_samples", 4, "--ref_images", 4]
    if case == "one_sample":
        argv[2:4] = ["--num_samples", 1]
    if case == "too_many_refs":  # toy faces: 50,000 val + 50,000 test
        argv[4:] = ["--ref_images", 200_000]
    if case == "refs_folder_is_a_file":
        (workdir / "experiments/fid_refs").write_text("a file")
    if case == "fid_json_is_a_folder":
        (workdir / "experiments/e/fid.json").mkdir()
    one_line_error(*fid_error(capsys, *argv), message)


@pytest.mark.parametrize("bad", [
    {"mu": np.array(["0", "0", "0", "0"]), "sigma": np.eye(4)},  # strings
    {"mu": np.zeros(4), "sigma": -np.eye(4)},  # negative variances: no covariance
    {"mu": np.zeros(4), "sigma": np.eye(4), "features": np.zeros((5, 3))},  # 3 features, not 4
    {"mu": np.zeros(4), "sigma": np.eye(4), "features": np.zeros(4)},  # not one row per image
])
def test_fid_refuses_statistics_that_are_not_a_mean_and_covariance(workdir, capsys, no_weights, bad):
    np.savez(workdir / "good.npz", mu=np.zeros(4), sigma=np.eye(4), features=np.ones((5, 4)))
    np.savez(workdir / "bad.npz", **bad)
    code, err = fid_error(capsys, workdir / "good.npz", workdir / "bad.npz")
    one_line_error(code, err, f"{workdir / 'bad.npz'}: mu (4,)")
    assert "are not a mean, its covariance and the features; compute it again" in err


def test_fid_refuses_a_covariance_that_is_not_symmetric(workdir, capsys, no_weights):
    np.savez(workdir / "good.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(workdir / "bad.npz", mu=np.zeros(4), sigma=np.eye(4) + np.triu(np.ones((4, 4)), 1))
    code, err = fid_error(capsys, workdir / "good.npz", workdir / "bad.npz")
    one_line_error(code, err, f"{workdir / 'bad.npz'}: sigma is not symmetric, so not a covariance")


def test_fid_refuses_a_covariance_with_a_negative_eigenvalue_and_statistics_of_nothing(workdir, capsys,
                                                                                       no_weights):
    np.savez(workdir / "good.npz", mu=np.zeros(4), sigma=np.eye(4))
    sigma = np.eye(4)
    sigma[0, 1] = sigma[1, 0] = 2  # symmetric, variances >= 0, eigenvalues 3, 1, 1 and -1
    np.savez(workdir / "bad.npz", mu=np.zeros(4), sigma=sigma)
    code, err = fid_error(capsys, workdir / "good.npz", workdir / "bad.npz")
    one_line_error(code, err, f"{workdir / 'bad.npz'}: sigma has an eigenvalue -1 < 0, so is not a covariance")
    np.savez(workdir / "empty.npz", mu=np.zeros(0), sigma=np.zeros((0, 0)))
    code, err = fid_error(capsys, workdir / "empty.npz", workdir / "empty.npz")
    one_line_error(code, err, f"{workdir / 'empty.npz'}: mu (0,) float64, sigma (0, 0) float64")


@pytest.mark.parametrize("rows", [0, 1])
def test_fid_refuses_features_too_few_for_kid_before_printing_the_fid(workdir, capsys, no_weights, rows):
    np.savez(workdir / "good.npz", mu=np.zeros(4), sigma=np.eye(4), features=np.ones((5, 4)))
    np.savez(workdir / "few.npz", mu=np.zeros(4), sigma=np.eye(4), features=np.ones((rows, 4)))
    with pytest.raises(SystemExit) as e:
        fid.main([str(workdir / "good.npz"), str(workdir / "few.npz")])
    out, err = capsys.readouterr()
    assert out == "" and "FID" not in err  # refused before the first figure
    one_line_error(e.value.code, err, f"few.npz holds features of {rows} image(s), and KID needs 2 or more")


def test_fid_refuses_statistics_that_are_not_finite(workdir, capsys, no_weights):
    good = {"mu": np.zeros(4), "sigma": np.eye(4)}
    np.savez(workdir / "good.npz", **good)
    np.savez(workdir / "nan.npz", mu=np.array([0, np.nan, 0, 0]), sigma=np.eye(4))
    infinite = np.eye(4)
    infinite[2, 2] = np.inf
    np.savez(workdir / "inf.npz", mu=np.zeros(4), sigma=infinite)
    np.savez(workdir / "nan_features.npz", **good, features=np.full((3, 4), np.nan))
    for bad in ("nan.npz", "inf.npz", "nan_features.npz"):
        code, err = fid_error(capsys, workdir / "good.npz", workdir / bad)
        one_line_error(code, err, f"{bad} holds numbers that are not finite (NaN or inf)")


# --- one writer per experiment --------------------------------------------------------------------

def trainer(exp_name, *flags):
    """A `train` in its own process, in its own process group, its output read line by line."""
    return subprocess.Popen([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name",
                             exp_name, *map(str, flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp)


def wait_for_step(proc, step):
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):
            return
    pytest.fail(f"the trainer ended before step {step}: {proc.stderr.read()}")


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(workdir, capsys):
    """While a run trains, `train --resume` of its experiment is one line naming the process that
    holds it, and changes nothing; once that process is killed (kill -9: no chance to clean up),
    the next --resume says it takes the lock over and continues; a finished run leaves no lock."""
    first = trainer("e", *SMALL_RUN, "--max_steps", 100_000, "--ckpt_every", 2, "--eval_every",
                    1000)
    try:
        wait_for_step(first, 4)
        lock = workdir / "experiments/e/train.lock"
        assert lock.read_text().split()[0] == str(first.pid)
        saved = checkpoint("e")["step"]
        code, out, err = cli(capsys, "train", "--exp_name", "e", "--resume", "--max_steps", 3)
        one_line_error(code, err, f"experiment experiments/e is being trained by process "
                                  f"{first.pid} on ")
        assert "resuming" not in out and lock.read_text().split()[0] == str(first.pid)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)
    assert lock.is_file() and checkpoint("e")["step"] >= saved  # the killed run left its lock
    step = checkpoint("e")["step"]
    code, out, err = cli(capsys, "train", "--exp_name", "e", "--resume", "--max_steps", step + 2)
    assert code == 0, err
    assert f"taking over {Path('experiments/e/train.lock')}: process {first.pid}, which held it, " \
           f"no longer runs" in out
    assert checkpoint("e")["step"] == step + 2 and not lock.exists()


def test_a_lock_of_a_live_process_on_this_machine_is_respected(workdir, capsys):
    """The lock names this test's own process, which runs: refused, and the lock stays."""
    assert cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 1)[0] == 0
    lock = workdir / "experiments/e/train.lock"
    lock.write_text(f"{os.getpid()} {cg.socket.gethostname()} {lock.parent.resolve()}\n")
    code, _, err = cli(capsys, "train", "--exp_name", "e", "--resume", "--max_steps", 2)
    one_line_error(code, err, f"is being trained by process {os.getpid()}")
    assert lock.read_text().split()[0] == str(os.getpid()) and checkpoint("e")["step"] == 1
    (workdir / "experiments/f").mkdir()  # a run that has not saved yet: only its lock
    (workdir / "experiments/f/train.lock").write_text(lock.read_text().replace("/e\n", "/f\n"))
    code, out, err = cli(capsys, "train", "--exp_name", "f", *SMALL_RUN, "--max_steps", 1)
    one_line_error(code, err, f"is being trained by process {os.getpid()}")
    assert "starting it afresh" not in out  # the refusal is the only word
    (workdir / "same").symlink_to(lock.parent.resolve())  # the same folder by another path
    lock.write_text(f"{os.getpid()} {cg.socket.gethostname()} {workdir / 'same'}\n")
    one_line_error(*cli(capsys, "train", "--exp_name", "e", "--resume", "--max_steps", 2)[::2],
                   f"is being trained by process {os.getpid()}")
    lock.write_text(f"{os.getpid()} {cg.socket.gethostname()} {lock.parent.resolve()}\n")
    # the same lock copied, with its folder, into another experiment: that one's process is not
    # training this copy, so the copy's lock is taken over
    shutil.copytree(lock.parent, workdir / "experiments/copy")
    code, out, err = cli(capsys, "train", "--exp_name", "copy", "--resume", "--max_steps", 2)
    assert code == 0 and checkpoint("copy")["step"] == 2, err
    assert f"taking over {Path('experiments/copy/train.lock')}: it was copied from {lock.parent.resolve()}" in out
    assert not (workdir / "experiments/copy/train.lock").exists() and lock.is_file()


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_stops_a_run_as_ctrl_c_does(workdir, nproc):
    """SIGTERM (kill, timeout, a scheduler) to the trainer, twice, as a scheduler may: the step in
    flight finishes and is saved, and the line says where to resume; under --nproc 2 the parent
    passes it on to its workers as Ctrl-C, once."""
    run = trainer("term", *SMALL_RUN, "--nproc", nproc, "--max_steps", 100_000, "--ckpt_every", 1000,
                  "--eval_every", 1000)
    wait_for_step(run, 3)
    run.send_signal(signal.SIGTERM)
    heard = "SIGTERM" if nproc == 1 else "Ctrl-C"  # the parent passes it on as Ctrl-C
    for line in run.stderr:  # the first was heard
        if line.startswith(f"{heard}: stopping after this step"):
            break
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    step = checkpoint("term")["step"]
    assert run.returncode == 130 and "Traceback" not in err and step >= 3, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted at step {step}; experiments/term/checkpoints/last.pt holds step {step}; resume "
        f"with: python {ROOT / 'celebgen.py'} train --exp_name term --resume"), err


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_closed_terminal_stops_a_run_as_ctrl_c_does(workdir, nproc):
    """Closing the terminal sends SIGHUP to every process of the command (here: the trainer and its
    DataLoader workers, and the processes of --nproc 2), twice (the shell passes it on, and the
    kernel sends it), and writing to that terminal fails from then on: the step in flight finishes
    and is saved, as after one Ctrl-C, with no traceback (stderr is a pipe here, to be read), and
    the run ends with 130."""
    terminal, tty = pty.openpty()
    run = subprocess.Popen([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name", "hup",
                            *map(str, SMALL_RUN), "--workers", "1", "--nproc", str(nproc),
                            "--max_steps", "100000", "--ckpt_every", "1000", "--eval_every", "1000"],
                           stdout=tty, stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp)
    os.close(tty)
    shown = b""
    while b"step 3/" not in shown:
        try:
            shown += os.read(terminal, 4096)
        except OSError:  # the trainer ended, and the terminal with it
            pytest.fail(f"the trainer ended before step 3: {run.communicate()[1]}")
    os.killpg(run.pid, signal.SIGHUP)
    os.close(terminal)  # the terminal is gone: writing to it fails
    heard = run.stderr.readline() + run.stderr.readline()  # a blank line, then what was heard
    assert heard == "\nCtrl-C: stopping after this step (Ctrl-C again to stop at once)\n", heard
    with contextlib.suppress(ProcessLookupError):  # the second (as a shell's), when the first is
        os.killpg(run.pid, signal.SIGHUP)  # handled (at once, they would arrive as one)
    err = heard + run.communicate(timeout=120)[1]
    step = checkpoint("hup")["step"]
    assert run.returncode == 130 and "Traceback" not in err and step >= 3, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted at step {step}; experiments/hup/checkpoints/last.pt holds step {step}; resume "
        f"with: python {ROOT / 'celebgen.py'} train --exp_name hup --resume"), err


def test_a_second_hang_up_is_not_a_second_ctrl_c():
    """The shell passes a closed terminal's SIGHUP on and the kernel sends one too: they count as
    one Ctrl-C, which stops training after its step, not two, which stop it at once."""
    heard, previous = [], [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP)]
    signal.signal(signal.SIGINT, lambda *_: heard.append("Ctrl-C"))
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a command starts without nohup
    try:
        cg.hang_up_as_ctrl_c()
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)  # each handled before the next is sent
    finally:
        for s, handler in zip((signal.SIGINT, signal.SIGHUP), previous):
            signal.signal(s, handler)
    assert heard == ["Ctrl-C"]


def test_a_run_under_nohup_outlives_its_terminal(workdir):
    """nohup starts a command with SIGHUP ignored: the run goes on when its terminal closes."""
    ignore_hang_up = lambda: (os.setpgrp(), signal.signal(signal.SIGHUP, signal.SIG_IGN))
    run = subprocess.Popen([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name", "nohup",
                            *map(str, SMALL_RUN), "--workers", "1", "--max_steps", "8", "--eval_every",
                            "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=ignore_hang_up)
    wait_for_step(run, 3)
    os.killpg(run.pid, signal.SIGHUP)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0 and "step 8/8" in out and checkpoint("nohup")["step"] == 8, err


def report_dispositions(queue):
    cg.ignore_interrupts(0)
    queue.put([int(signal.getsignal(s)) for s in cg.INTERRUPTS])


def test_spawned_loader_workers_ignore_every_interrupt():
    """DataLoader workers that are spawned (macOS, Windows), not forked, inherit no handler from the
    trainer: ignore_interrupts has them ignore Ctrl-C, SIGTERM and a closed terminal's SIGHUP, which
    stop the trainer alone (after its step), and it then stops them."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=report_dispositions, args=(queue,))
    worker.start()
    try:
        assert queue.get(timeout=120) == [int(signal.SIG_IGN)] * (2 + hasattr(signal, "SIGHUP"))
    finally:
        worker.join(60)


# --- a DDP worker killed by the operating system ---------------------------------------------------

def test_spawning_again_passes_the_resource_trackers_warning_filter_once(monkeypatch):
    """quiet_spawn silences the resource tracker's warning through sys.warnoptions, which the
    processes multiprocessing starts later take as -W options: a notebook that trains many times
    adds it once."""
    monkeypatch.setattr(sys, "warnoptions", [])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for _ in range(3):
        with cg.quiet_spawn(None):
            pass
    assert sys.warnoptions == ["ignore:resource_tracker:UserWarning"]


def running(pid):
    """Whether process `pid` still runs: not a zombie, which has exited and waits only to be reaped
    (one whose parent died first is reaped by PID 1, at its own pace)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # reaped
        return False


def spawned_workers(parent):
    """PIDs of the processes mp.spawn started under `parent`, in the order of their ranks."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            pass
    return sorted(found)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs signal masks")
def test_a_ctrl_c_held_back_reaches_the_training_loop_at_once():
    """A Ctrl-C that came while Ctrl-C was held back (as in a worker that mp.spawn starts) reaches the
    training loop's InterruptRequest as soon as its handler is set, so that a second one can still stop
    the run at once."""
    previous = signal.signal(signal.SIGINT, lambda *a: None)  # whatever is still pending lands here
    try:
        with cg.interrupts_held(signal.SIGINT):  # held in this thread: sent to it, not to torch's threads
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            with cg.InterruptRequest(announce=False, sigterm=False) as interrupt:
                delivered = interrupt.requested
    finally:
        signal.signal(signal.SIGINT, previous)
    assert delivered


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("starting", ["ranks", "loaders"])
def test_ctrl_c_while_ddp_workers_start_is_not_lost(workdir, starting):
    """Ctrl-C to the process group as soon as mp.spawn has started the 2 workers (ranks), or as soon
    as a rank has started its DataLoader worker (loaders), while they still import torch: the run
    stops after its first step, saves it and says so (exit 130), as once running; it neither
    trains on regardless nor ends in tracebacks."""
    run = trainer("start", *SMALL_RUN, "--nproc", 2, "--max_steps", 100_000, "--eval_every", 1000,
                  "--workers", 1)
    started = {"ranks": lambda: len(spawned_workers(run.pid)) == 2,
               "loaders": lambda: any(spawned_workers(rank) for rank in spawned_workers(run.pid))}
    try:
        deadline = time.monotonic() + 60
        while not started[starting]() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:  # trained on: the Ctrl-C was lost
            os.killpg(run.pid, signal.SIGKILL)
    step = checkpoint("start")["step"]
    assert run.returncode == 130 and "Traceback" not in err and err.count("interrupted at step") == 1, err
    assert err.strip().splitlines()[-1].startswith(f"interrupted at step {step}; ")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_killed_ddp_worker_is_one_line_and_the_run_resumes(workdir):
    """kill -9 of rank 1 of 2 gloo processes mid-run: rank 0, the parent and both ranks'
    DataLoader workers are gone within seconds (the workers at once: torch's own check of their
    parent would take 5 s), the parent's last word is one line (the rank, the signal, the likely
    cause, the intact checkpoint and the command to resume), and --resume continues from that
    checkpoint."""
    run = trainer("ddp", *SMALL_RUN, "--nproc", 2, "--max_steps", 100_000, "--ckpt_every", 2,
                  "--eval_every", 1000, "--workers", 1)
    wait_for_step(run, 5)
    workers = spawned_workers(run.pid)
    loaders = [pid for worker in workers for pid in spawned_workers(worker)]
    assert len(workers) == 2 and len(loaders) == 2
    killed = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    out, err = run.communicate(timeout=120)
    gone = time.monotonic() - killed
    time.sleep(1.0)
    assert run.returncode == 1 and "Traceback" not in err, err
    assert not any(running(pid) for pid in workers + loaders) and gone < 60
    step = checkpoint("ddp")["step"]
    assert err.strip().splitlines()[-1] == (
        f"error: process 1 of 2 was killed by SIGKILL (the kernel sends SIGKILL when memory runs "
        f"out: lower --batch_size or --nproc, or free memory); the others were stopped; "
        f"experiments/ddp/checkpoints/last.pt (step {step}) is intact; resume with: python "
        f"{ROOT / 'celebgen.py'} train --exp_name ddp --resume")
    assert err.count("\n") == 1, err
    resume = subprocess.run([sys.executable, str(ROOT / "celebgen.py"), "train", "--exp_name",
                             "ddp", "--resume", "--max_steps", str(step + 2)],
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0 and f"resuming ddp from step {step}" in resume.stdout, \
        resume.stderr
    assert "taking over" not in resume.stdout and checkpoint("ddp")["step"] == step + 2  # unlocked


# --- more of the same kinds, as a careless user meets them ---------------------------------------

def test_resume_cannot_switch_the_dataset(workdir, capsys):
    from test_training import labelled_celeba
    labelled_celeba(workdir / "data")
    assert cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 1)[0] == 0
    code, _, err = cli(capsys, "train", "--exp_name", "e", "--resume", "--dataset", "celeba",
                       "--data_root", "data", "--max_steps", 2)
    one_line_error(code, err, "--resume cannot change --dataset toy -> celeba")
    assert checkpoint("e")["step"] == 1


def test_a_resume_refused_builds_no_image_cache_first(workdir, capsys):
    """The resume check comes before the (on CelebA, minutes long) image cache is built."""
    from test_training import labelled_celeba
    labelled_celeba(workdir / "data")
    run = ["--dataset", "celeba", "--data_root", "data", *SMALL_RUN[2:], "--max_steps", 1]
    assert cli(capsys, "train", "--exp_name", "e", *run)[0] == 0
    caches = sorted((workdir / "experiments/image_cache").glob("*.u8"))
    code, out, err = cli(capsys, "train", "--exp_name", "e", "--resume", "--image_size", 32)
    one_line_error(code, err, "--resume cannot change --image_size 16 -> 32")
    assert "decoding" not in out and sorted((workdir / "experiments/image_cache").glob("*.u8")) \
        == caches


def test_a_folder_where_a_png_goes_says_so_and_keeps_the_step(workdir, capsys):
    (workdir / "experiments/g/samples/step_0000002.png").mkdir(parents=True)
    code, _, err = cli(capsys, "train", "--exp_name", "g", *SMALL_RUN, "--max_steps", 3,
                       "--ckpt_every", 1, "--sample_every", 2, "--eval_every", 100)
    one_line_error(code, err, "step_0000002.png (Is a directory); move that folder away")
    assert checkpoint("g")["step"] == 2


def test_ctrl_c_is_one_line_even_while_torch_is_half_imported(monkeypatch, capsys):
    """Ctrl-C may land while a module is being imported (torch._dynamo, say): its line and status
    130 do not depend on that module."""
    import types
    monkeypatch.setattr(cg, "torch", types.SimpleNamespace())  # torch._dynamo: AttributeError

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cg.exit_on_user_error(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.startswith("interrupted (")


def test_two_samples_do_not_share_a_folder_and_a_killed_ones_is_cleared(workdir, capsys):
    """Each `sample` writes into a folder of its own process; the one of a process that no longer
    runs is removed, as is one of this process's number (a killed process's, whose number came
    back), and that of one that runs (here: this test's parent) is left alone."""
    assert cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 1)[0] == 0
    samples = workdir / "experiments/e/samples"
    dead, alive, own = (samples / f"last_euler2_seed0.{pid}.partial"
                        for pid in (2**22 + 1, os.getppid(), os.getpid()))
    for folder in (dead, alive, own):
        folder.mkdir()
        (folder / "000000.png").write_bytes(b"half")
    code, _, err = cli(capsys, "sample", "--exp_name", "e", "--num_samples", 2,
                       "--num_sampling_steps", 2)
    assert code == 0, err
    assert not dead.exists() and not own.exists() and alive.is_dir()
    assert sorted(p.name for p in (samples / "last_euler2_seed0").iterdir()) == [
        "000000.png", "000001.png"]


def test_guidance_without_a_request_is_refused(workdir, capsys):
    assert cli(capsys, "train", "--exp_name", "c", *SMALL_RUN, "--attributes", "Smiling",
               "--max_steps", 1)[0] == 0
    code, _, err = cli(capsys, "sample", "--exp_name", "c", "--cfg_scale", 3)
    one_line_error(code, err, "--cfg_scale 3 turns up a request, and none was made")
    for weight in (0, 1):  # unconditional and conditional sampling of nothing asked: both fine
        assert cli(capsys, "sample", "--exp_name", "c", "--cfg_scale", weight, "--num_samples", 1,
                   "--num_sampling_steps", 1)[0] == 0


def test_paths_of_the_wrong_kind_are_named_as_such(workdir, capsys, no_weights):
    assert cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 1)[0] == 0
    for folder in ("experiments/e/checkpoints", workdir / "experiments/e/checkpoints"):
        code, _, err = cli(capsys, "sample", "--exp_name", "e", "--checkpoint", folder)
        one_line_error(code, err, f"checkpoint {folder} is a folder; list the experiment's")
    (workdir / "stats.npz").mkdir()
    np.savez(workdir / "ok.npz", mu=np.zeros(4), sigma=np.eye(4))
    one_line_error(*fid_error(capsys, workdir / "stats.npz", workdir / "ok.npz"),
                   "stats.npz is a folder")
    (workdir / "cut.npz").write_bytes((workdir / "ok.npz").read_bytes()[:100])
    (workdir / "empty.npz").write_bytes(b"")
    for bad in ("cut.npz", "empty.npz"):
        one_line_error(*fid_error(capsys, workdir / bad, workdir / "ok.npz"),
                       f"{bad} is not an .npz of FID statistics")
    (workdir / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 50 * i, dtype=np.uint8)).save(workdir / f"images/{i}.png")
    one_line_error(*fid_error(capsys, workdir / "images", workdir / "ok.npz"),
                   "the .npz holds statistics of 4 features, and a folder gives Inception's 2048")


def test_inception_weights_that_are_a_folder(workdir, capsys):
    for side in ("a", "b"):
        (workdir / side).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 50 * i, dtype=np.uint8)).save(workdir / side / f"{i}.png")
    code, err = fid_error(capsys, workdir / "a", workdir / "b", "--inception_weights", workdir)
    one_line_error(code, err, f"Inception weights {workdir} is a folder; pass the weights file")


def test_sample_draws_on_the_time_grid_asked_for_and_names_it(workdir, capsys):
    """--time_power P samples on the times 1 - (1 - i/S)^P (the images of cg.sample on that grid), in
    a folder whose name says P; a power outside (0, 5) is refused in one line."""
    assert cli(capsys, "train", "--exp_name", "e", *SMALL_RUN, "--max_steps", 1)[0] == 0
    for power in ("0", "5", "-1", "two"):
        code, _, err = cli(capsys, "sample", "--exp_name", "e", "--time_power", power)
        one_line_error(code, err, "argument --time_power: ")
    assert cli(capsys, "sample", "--exp_name", "e", "--num_samples", 2, "--num_sampling_steps", 3,
               "--time_power", 2, "--precision", "fp32", "--autoguidance", 1)[0] == 0  # the model alone
    written = cg.to_signed(cg.image_tensor(cg.Image.open(
        workdir / "experiments/e/samples/last_euler3_power2_autoguidance1_seed0/000000.png")))
    ckpt = cg.load_checkpoint(workdir / "experiments/e/checkpoints/last.pt")
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = cg.load_model(ckpt, torch.device("cpu"))
    on_grid = {p: cg.sample(model, noise, cg.time_grid(3, p))[0] for p in (1.0, 2.0)}
    assert (on_grid[2.0] - written).abs().max() <= 1.01 / 127.5  # the same up to 8-bit rounding
    assert (on_grid[1.0] - written).abs().max() > 3 / 127.5
