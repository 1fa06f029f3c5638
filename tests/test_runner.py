"""``python -m pretrain``: config and CLI, a complete tiny run, and its faults (SIGKILL mid-epoch, SIGTERM, NaN, Inf,
corrupt images).

The runs are the session's tiny pretraining (``spark_run`` in conftest.py: resnet18 at 64 px with a 64-wide decoder
on 16 generated images, 4 steps per epoch) and variants of it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import PRETRAIN_EPOCHS as EPOCHS
from conftest import PRETRAIN_STEPS_PER_EPOCH as STEPS_PER_EPOCH
from conftest import PRETRAIN_TINY as TINY
from conftest import pretrain_argv, run_pretrain

from pretrain.__main__ import build_parser, main
from pretrain.config import config_fields, overrides_to_argv, resolve_config
from pretrain.runtime.checkpoint import find_checkpoint
from pretrain.runtime.signals import StopRequest, parse_signals

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(pretrain_images) -> Path:
    return pretrain_images


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return pretrain_argv(data, out, *extra)


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return run_pretrain(argv)


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while not any(s >= step for s in _steps(out)):
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "run too slow"
        time.sleep(0.01)


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(spark_run) -> Path:
    """An uninterrupted run (also the end-to-end check of the outputs): the session's tiny pretraining."""
    return spark_run


# --- configuration and command line


def test_help_lists_every_config_field():
    text = build_parser().format_help()
    for f in config_fields():
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--preset" in text and "--print-config" in text and "[paper: 0.6; tiny: 0.6]" in text


def test_paper_preset_resolves_the_published_recipe(capsys):
    assert main(["--print-config", "--model", "resnet50"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    expected = {"mask_ratio": 0.6, "patch_size": 32, "input_size": 224, "opt": "lamb", "global_batch": 4096,
                "peak_lr": pytest.approx(2e-4 * 4096 / 256), "warmup_epochs": 40, "weight_decay": 0.04,
                "weight_decay_end": 0.2, "clip_grad": 5.0, "epochs": 1600, "scale": [0.67, 1.0],
                "decoder_width": 768, "densify_norm": "bn", "beta2": 0.95, "drop_path": 0.05}
    assert {k: cfg[k] for k in expected} == expected
    convnext = resolve_config("paper", {"model": "convnext_small"}, world_size=8)
    assert (convnext.densify_norm, convnext.beta2, convnext.drop_path) == ("ln", 0.999, 0.2)
    assert convnext.grad_accum_steps == 4096 // (128 * 8)
    tiny = resolve_config("tiny", {"beta2": 0.9})
    assert (tiny.model, tiny.input_size, tiny.beta2) == ("resnet18", 96, 0.9)  # explicit values win (issue 9: 96 px)


def test_overrides_round_trip_through_the_command_line(capsys):
    overrides = {"model": "convnext_atto", "ape": True, "hierarchy": False, "scale": [0.5, 1.0], "lr": None,
                 "stop_signals": ["SIGUSR1"], "out": "x"}
    assert main(["--print-config", "--preset", "tiny", *overrides_to_argv(overrides)]) == 0
    printed, expected = json.loads(capsys.readouterr().out), resolve_config("tiny", overrides).to_dict()
    assert printed.pop("precision")["amp"] in ("bf16", "none")  # this machine's choice, printed beside the config
    assert printed.pop("synced_batchnorm") is False and "precision" not in expected and printed == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--global-batch", "30", "--batch-size", "4"], "global_batch 30 is not a multiple"),
    (["--model", "no_such_net"], "cannot build model 'no_such_net'"),
    (["--mask-ratio", "1.5"], "mask_ratio must be in [0, 1)"),
    ([], "--out is required"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", *argv] if argv[:1] != ["--preset"] else argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_unreadable_checkpoint_is_a_runtime_error(capsys, tmp_path, data):
    (tmp_path / "checkpoint-last.pth").write_bytes(b"truncated")
    assert main([*TINY, "--data", str(data), "--out", str(tmp_path), "--resume", "auto"]) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err.strip().splitlines()[-1]


def test_existing_run_needs_resume_and_missing_data_is_a_runtime_error(capsys, tmp_path, data):
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--data", str(data), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "pass --resume auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY, "--data", str(data), "--out", str(tmp_path / "new"), "--resume", str(tmp_path / "nope.pth")])
    assert "--resume checkpoint not found" in capsys.readouterr().err
    assert main([*TINY, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m pretrain: error:") and "missing" in err


def test_stop_request_on_sigterm_and_sigusr1():
    stop = StopRequest()
    with stop.installed(parse_signals(["SIGTERM", "USR1"])):
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGUSR1"  # the first signal is kept
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        parse_signals(["SIGNOPE"])


# --- a complete run


def test_outputs_of_a_complete_run(reference):
    names = {p.name for p in reference.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint-last.pth", "encoder_timm.pth", "result.json",
            "tensorboard", "checkpoint-ep0002.pth"} <= names
    assert not [n for n in names if n.startswith("checkpoint-ep") and n != "checkpoint-ep0002.pth"]
    assert not [n for n in names if n.endswith(".tmp")]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert {"loss", "lr", "weight_decay", "grad_norm", "images_per_s", "epoch"} <= records[0].keys()
    assert records[0]["lr"] < records[STEPS_PER_EPOCH]["lr"]  # warm-up over the first epoch

    checkpoint = _checkpoint(reference)
    assert {"model", "optimizer", "scheduler", "state", "rng", "config", "epoch", "iteration"} <= checkpoint.keys()
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    assert checkpoint["config"] == json.loads((reference / "config.json").read_text())
    assert any(k.startswith("decoder.") for k in checkpoint["model"])

    encoder = torch.load(reference / "encoder_timm.pth", map_location="cpu", weights_only=True)
    model = timm.create_model(encoder["model_name"])  # every key of timm's 1000-class model, the head untrained
    model.load_state_dict(encoder["state_dict"], strict=True)
    assert torch.equal(encoder["state_dict"]["conv1.weight"], checkpoint["model"]["encoder.model.conv1.weight"])
    previous = torch.load(reference / "checkpoint-last.pth.prev", map_location="cpu", weights_only=False)
    assert previous["iteration"] < checkpoint["iteration"]  # the save before the last one is kept as .prev

    result = json.loads((reference / "result.json").read_text())
    assert result["stage"] == "pretrain" and result["model"] == "resnet18"
    assert {"metrics", "config", "inputs"} <= result.keys() and result["metrics"]["iterations"] == 12
    assert len(result["metrics"]["epoch_losses"]) == EPOCHS


def test_checkpoint_loads_in_the_visualize_tool(reference):
    from pretrain import visualize

    model, config = visualize.load_spark_checkpoint(reference / "checkpoint-last.pth")
    assert config["model"] == "resnet18" and model.input_size == 64


# --- faults


def _stop_mid_epoch(proc: subprocess.Popen, out: Path) -> int:
    """Freeze the run (SIGSTOP) once its latest checkpoint lies inside an epoch and return that checkpoint's
    iteration; the epoch end always saves too, so a run frozen a little late is let go on to its next save."""
    step = 2 * STEPS_PER_EPOCH - 1  # by then iteration 6, the middle of epoch 2, has been saved
    while True:
        _wait_for_step(proc, out, step)
        proc.send_signal(signal.SIGSTOP)
        latest = find_checkpoint(str(out))  # what a resume reads, even if frozen between the two renames of a save
        iteration = torch.load(latest, map_location="cpu", weights_only=False)["iteration"]
        if iteration % STEPS_PER_EPOCH:
            return iteration
        proc.send_signal(signal.SIGCONT)
        step = iteration + 3  # the next mid-epoch save (every 2 steps) is logged by then


def test_resume_after_sigkill_mid_epoch_gives_the_same_weights(data, reference, tmp_path):
    """Killed and resumed with 2 data workers (the tiny preset's), against the reference with none: each image's
    augmentation depends on (seed, epoch, its place in the epoch), not on the worker that drew it."""
    proc = _start(_argv(data, tmp_path, "--save-every", "2", "--workers", "2"))
    try:
        saved = _stop_mid_epoch(proc, tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (tmp_path / "result.json").exists()
    resumed = _run(_argv(data, tmp_path, "--save-every", "2", "--resume", "--workers", "2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"epoch {saved // STEPS_PER_EPOCH + 1}, iteration {saved}" in resumed.stderr  # resumed mid-epoch
    _assert_same_weights(_checkpoint(tmp_path)["model"], _checkpoint(reference)["model"])
    assert _steps(tmp_path) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))  # no duplicated log lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_stop_signal_saves_and_exits_cleanly_then_resume_finishes_identically(data, reference, tmp_path, sig):
    proc = _start(_argv(data, tmp_path, "--save-every", "100"))
    _wait_for_step(proc, tmp_path, 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"stopped by {sig.name}" in stdout and "--resume auto" in stdout
    stopped_at = _checkpoint(tmp_path)["iteration"]
    assert 2 <= stopped_at < EPOCHS * STEPS_PER_EPOCH and not (tmp_path / "result.json").exists()
    resumed = _run(_argv(data, tmp_path, "--save-every", "100", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"iteration {stopped_at}" in resumed.stderr
    _assert_same_weights(_checkpoint(tmp_path)["model"], _checkpoint(reference)["model"])


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(data, tmp_path):
    result = _run(_argv(data, tmp_path, "--save-every", "1", "--opt", "sgd", "--lr", "1e30"))
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "the loss is nan at iteration 2" in message and "last good checkpoint" in message
    checkpoint = _checkpoint(tmp_path)
    assert checkpoint["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert not (tmp_path / "result.json").exists()


def test_an_inf_loss_stops_the_step_naming_it_and_leaves_the_weights():
    """The trainer's non-finite check on a loss of +inf (the NaN case runs end to end above), and on an infinite
    gradient norm (a square root at 0): the step raises naming the iteration before anything is updated."""
    from pretrain.runtime.distributed import DistEnv
    from pretrain.runtime.loop import LoopSettings, NonFiniteError, Trainer
    from pretrain.runtime.precision import Precision
    from pretrain.runtime.runlog import RunLogger

    class Task:
        def __init__(self, model, loss):
            self.model, self._loss = model, loss

        def loss(self, images, labels, generator):
            return self._loss(self.model, images)

    model = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    cases = {"the loss is inf": lambda m, x: m(x).square().mean() + float("inf"),
             "the gradient norm is inf": lambda m, x: (m.weight - m.weight.detach()).sqrt().sum() + m(x).mean()}
    for what, loss in cases.items():
        trainer = Trainer(Task(model, loss), optimizer, lambda step: {}, LoopSettings(1, 1, 1, 0.0), DistEnv(),
                          Precision("none", False, "cpu", "test"), RunLogger("", False, False, False), StopRequest(),
                          lambda *a, **k: None)
        trainer.state.step = 4
        with pytest.raises(NonFiniteError, match=f"{what} at iteration 5"):
            trainer.step([(torch.ones(2, 3), torch.zeros(2))])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())


def test_corrupt_images_are_skipped_and_counted_during_a_run(data, tmp_path, caplog):
    """15 good images and one that is not an image: each epoch reads all 16, skips the bad one with a warning, and
    the count reaches metrics.jsonl and result.json."""
    from pretrain.__main__ import run

    images = tmp_path / "images" / "only"
    images.mkdir(parents=True)
    for path in sorted(data.rglob("*.png"))[:15]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"not a PNG at all" * 8)
    caplog.set_level("WARNING")
    out = tmp_path / "run"
    outcome = run(pretrain_argv(tmp_path / "images", out, "--no-tensorboard", epochs=1))
    assert outcome.status == "completed"
    assert "broken.png" in caplog.text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_images"] == 1 and records[-1]["images_seen"] == 15
    assert json.loads((out / "result.json").read_text())["metrics"]["skipped_images"] == 1
