"""Device and precision: what --precision auto picks on each kind of machine, fp16 with loss scaling,
checkpoints that cross precisions, and the devices that are not here."""
import re
import subprocess
import sys

import pytest
import torch

import celebgen as cg
from conftest import ROOT
from test_training import TOY, checkpoint, cli

CPU = torch.device("cpu")


@pytest.mark.parametrize("machine,expected", [
    (("cpu", None, 2.3), "bf16"),     # AVX512-BF16 / AMX: bf16 matmul measured 2.3x fp32
    (("cpu", None, 0.07), "fp32"),    # AVX2 only: bf16 emulated
    (("cpu", None, 1.1), "fp32"),     # no clear gain: fp32 is as fast and exact
    (("cuda", (9, 0), None), "bf16"),  # H100
    (("cuda", (8, 0), None), "bf16"),  # A100
    (("cuda", (7, 5), None), "fp16"),  # T4
    (("cuda", (7, 0), None), "fp16"),  # V100
    (("mps", None, None), "fp32"),
])
def test_auto_precision_for_each_kind_of_machine(machine, expected):
    precision, why = cg.choose_precision(*machine)
    assert precision == expected and why


def test_auto_precision_on_this_cpu_follows_the_measured_matmul(monkeypatch):
    speedup = cg.cpu_matmul_speedup("bf16")
    assert 0 < speedup < 100 and cg.cpu_matmul_speedup("bf16") == speedup  # measured once, then cached
    assert cg.resolve_precision("auto", CPU)[0] == ("bf16" if speedup >= cg.BF16_SPEEDUP_NEEDED else "fp32")
    for measured, expected in [(2.0, "bf16"), (0.05, "fp32")]:
        monkeypatch.setattr(cg, "cpu_matmul_speedup", lambda precision, n=512: measured)
        assert cg.resolve_precision("auto", CPU) == cg.choose_precision("cpu", None, measured)
        assert cg.resolve_precision("auto", CPU)[0] == expected
        assert cg.resolve_precision("fp32", CPU) == ("fp32", "as asked")  # explicit choices are kept


def test_explicit_slow_precision_is_kept_with_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(cg, "cpu_matmul_speedup", lambda precision, n=512: 0.05)
    assert cg.resolve_precision("bf16", CPU) == ("bf16", "as asked")
    assert "bf16 matmuls run at 0.05x fp32 on this CPU" in capsys.readouterr().err


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert cg.pick_device("auto").type == expected
        assert cg.pick_device("cpu").type == "cpu"
    with pytest.raises(cg.UserError, match="--device cuda, but PyTorch .* sees no CUDA device"):
        cg.pick_device("cuda")


def test_sixteen_bit_formats_and_the_residual_stream_under_autocast():
    """What the autocast comment states: fp16 flushes a tiny gradient to zero where bf16 keeps it (hence
    loss scaling for fp16 only); under autocast every block's output, the residual stream, is 16-bit, while
    the weights and the loss stay fp32."""
    assert torch.tensor(1e-8).half() == 0 and torch.tensor(1e-10).bfloat16() != 0
    torch.manual_seed(0)
    model = cg.DiT(8, 4, dim=64, depth=2, heads=1)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
    for precision, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        outputs.clear()
        with cg.autocast(CPU, precision):
            x1, x0, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2)
            loss = cg.flow_loss(model, x1, x0, t, 0.05)
        assert outputs == [dtype, dtype] and loss.dtype == torch.float32, precision
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32


def val_losses(out):
    return [float(v) for v in re.findall(r"val loss \(EMA\) ([0-9.]+)", out)]


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_trainers_matmuls_run_at_the_precision_asked(workdir, capsys, monkeypatch, precision, dtype):
    """Every Linear of the training step (and of the EMA's validation and sample grid) gives outputs of
    the autocast dtype: bf16 under --precision bf16, fp32 under fp32."""
    seen, build_model = set(), cg.build_model

    def recorded(args):  # the EMA, a deep copy, keeps the hooks
        model = build_model(args)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
        return model
    monkeypatch.setattr(cg, "build_model", recorded)
    code, _, err = cli(capsys, "train", "--exp_name", precision, *TOY, "--precision", precision,
                       "--batch_size", 4, "--max_steps", 1)
    assert code == 0, err
    assert seen == {dtype}


def test_fp16_with_loss_scaling_trains_like_fp32(workdir, capsys):
    """The same 24 steps in fp16 (GradScaler on) and fp32: finite, falling, and close to each other."""
    losses = {}
    for precision in ("fp32", "fp16"):
        code, out, err = cli(capsys, "train", "--exp_name", precision, *TOY, "--precision", precision,
                             "--batch_size", 4, "--max_steps", 24, "--eval_every", 4)
        assert code == 0, err
        assert out.splitlines()[0].startswith(f"device cpu, precision {precision} -> {precision}")
        losses[precision] = val_losses(out)
    assert len(losses["fp16"]) == 6 and losses["fp16"][-1] < 0.8 * losses["fp16"][0]
    for a, b in zip(losses["fp32"], losses["fp16"]):
        assert abs(a - b) < 0.05 * a, losses
    assert checkpoint("fp16")["scaler"]["scale"] > 1  # the loss really was scaled
    assert checkpoint("fp32")["scaler"] == {}          # and only in fp16


def test_an_fp16_resume_puts_the_loss_scaler_back(workdir, capsys):
    """The loss scaler's state (its scale, and the steps counted towards raising it) is saved and
    restored: fp16 stopped at step 2 and resumed to 4 ends with the scaler of a run straight to 4."""
    for name, stops in (("straight", (4,)), ("resumed", (2, 4))):
        for i, stop in enumerate(stops):
            flags = ("--resume",) if i else (*TOY, "--precision", "fp16", "--batch_size", 4)
            assert cli(capsys, "train", "--exp_name", name, *flags, "--max_steps", stop)[0] == 0
    straight, resumed = checkpoint("straight")["scaler"], checkpoint("resumed")["scaler"]
    assert straight == resumed and straight["_growth_tracker"] == 4, (straight, resumed)


def test_a_checkpoint_resumes_and_samples_under_another_precision(workdir, capsys):
    code, out, err = cli(capsys, "train", "--exp_name", "mixed", *TOY, "--precision", "fp16",
                         "--batch_size", 4, "--max_steps", 2)
    assert code == 0, err
    code, out, err = cli(capsys, "train", "--exp_name", "mixed", "--resume", "--precision", "fp32",
                         "--max_steps", 4)
    assert code == 0 and "resuming mixed from step 2" in out and "step 4/4" in out, err
    ckpt = checkpoint("mixed")
    assert ckpt["args"]["resolved_precision"] == "fp32" and ckpt["scaler"] == {}
    code, out, err = cli(capsys, "train", "--exp_name", "mixed", "--resume", "--precision", "fp16",
                         "--max_steps", 5)  # fp32 -> fp16: a fresh scaler
    assert code == 0 and "step 5/5" in out, err
    for precision in ("bf16", "fp16", "fp32"):
        code, out, err = cli(capsys, "sample", "--exp_name", "mixed", "--num_samples", 1,
                             "--num_sampling_steps", 2, "--precision", precision)
        assert code == 0 and "wrote 1 image to" in out, err


def test_auto_is_resolved_again_on_resume(workdir, capsys, monkeypatch):
    """A run started under auto on one machine and resumed on another takes the new machine's choice,
    and args.json says which was used."""
    argv = [a for a in TOY if a not in ("--precision", "fp32")]
    monkeypatch.setattr(cg, "cpu_matmul_speedup", lambda precision, n=512: 0.05)
    code, out, err = cli(capsys, "train", "--exp_name", "moved", *argv, "--batch_size", 4, "--max_steps", 1)
    assert code == 0, err
    assert out.splitlines()[0] == ("device cpu, precision auto -> fp32 (this CPU has no fast bf16 units: "
                                   "bf16 matmul 0.05x fp32)")
    assert '"resolved_precision": "fp32"' in (workdir / "experiments/moved/args.json").read_text()
    monkeypatch.setattr(cg, "cpu_matmul_speedup", lambda precision, n=512: 2.0)
    code, out, err = cli(capsys, "train", "--exp_name", "moved", "--resume", "--max_steps", 2)
    assert code == 0 and out.startswith("device cpu, precision auto -> bf16"), err
    assert checkpoint("moved")["args"]["resolved_precision"] == "bf16"


def test_what_mps_cannot_do_is_one_line(workdir, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    code, _, err = cli(capsys, "train", "--exp_name", "mps", *TOY, "--device", "mps", "--nproc", 2)
    assert code == 2 and err.count("\n") == 1 and "DDP cannot run on MPS" in err, err
    assert not (workdir / "experiments").exists()

    def missing_kernel(*args):
        raise NotImplementedError("The operator 'aten::foo' is not currently implemented for the MPS device."
                                  " If you want this op to be added in priority ...")
    monkeypatch.setattr(cg, "flow_loss", missing_kernel)
    code, _, err = cli(capsys, "train", "--exp_name", "cpu", *TOY, "--device", "cpu", "--batch_size", 4,
                       "--max_steps", 1)
    assert code == 2 and err.count("\n") == 1 and "PYTORCH_ENABLE_MPS_FALLBACK=1" in err, err


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 6553600000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()])
def test_memory_running_out_is_one_line_and_other_runtime_errors_are_not_hidden(workdir, capsys, monkeypatch,
                                                                               error):
    def out_of_memory(*args):
        raise error
    monkeypatch.setattr(cg, "flow_loss", out_of_memory)
    code, _, err = cli(capsys, "train", "--exp_name", "oom", *TOY, "--batch_size", 4, "--max_steps", 1)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: out of memory (") and \
        "); lower --batch_size (memory grows with it, the image size and the model), then run" in err, err
    cpu = "DefaultCPUAllocator" in str(error)  # its size in bytes, said in GiB
    assert "(6.1 GiB asked for at once)" in err if cpu else "GiB asked" not in err
    monkeypatch.setattr(cg, "flow_loss", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli(capsys, "train", "--exp_name", "bug", *TOY, "--batch_size", 4, "--max_steps", 1)


def test_a_device_that_is_not_here_is_one_line_in_the_shell(workdir):
    for argv in (["sample", "--exp_name", "x", "--device", "cuda"],
                 ["train", "--exp_name", "x", "--dataset", "toy", "--device", "mps"]):
        run = subprocess.run([sys.executable, str(ROOT / "celebgen.py"), *argv], capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
        assert "sees no" in run.stderr and not (workdir / "experiments").exists()
