"""DDP: 2 gloo ranks with batch b equal 1 rank with batch 2b; unused parameters; SLURM/torchrun environments."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from encoder_properties import add_branch_noise
from equivalence import assert_per_tensor_close

from pretrain.config import resolve_config
from pretrain.data import make_demo_dataset
from pretrain.optim import build_optimizer
from pretrain.runtime.distributed import (
    TORCH_LAUNCH_VARIABLES,
    DistEnv,
    freeze_unused_parameters,
    init_distributed,
    shutdown_distributed,
    world_size_from_environment,
    wrap_ddp,
)
from pretrain.runtime.loop import LoopSettings, Trainer
from pretrain.runtime.precision import Precision
from pretrain.runtime.runlog import RunLogger
from pretrain.runtime.signals import StopRequest
from pretrain.spark import build_spark
from pretrain.syncbn import RankSyncedBatchNorm2d, sync_batchnorm

REPO = Path(__file__).resolve().parents[1]
SIZE, PER_RANK, STEPS, ACCUM = 64, 2, 3, 2
MODELS = ("resnet18", "convnext_atto")  # sparse BN synchronised over ranks; LN model with an unused head.norm


def _setup(name: str, world_size: int):
    """Model, optimiser and config exactly as the runner builds them (same initial weights everywhere), in float64
    and with noise on biases, norm affines and layer scales so that every branch has a gradient to synchronise."""
    cfg = resolve_config("paper", {"model": name, "input_size": SIZE, "decoder_width": 64, "out": "unused",
                                   "batch_size": PER_RANK * 2 // world_size, "global_batch": 2 * PER_RANK * ACCUM,
                                   "lr": 0.01, "opt": "sgd", "amp": "none", "channels_last": False},
                         world_size=world_size, check_model=False)
    torch.manual_seed(0)
    model = build_spark(name, decoder_width=64, input_size=SIZE, densify_norm=cfg.densify_norm).double()
    add_branch_noise(model, seed=0)
    frozen = freeze_unused_parameters(model, torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))
    if world_size > 1:
        sync_batchnorm(model)
    return cfg, model, frozen, build_optimizer(model, cfg)


def _data(model, step: int, micro: int):
    """The global batch (2 x PER_RANK images) of one forward pass and its masks."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    images = torch.randn(2 * PER_RANK, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    return images, model.mask(2 * PER_RANK, "cpu", generator=generator)


class _GivenMasks:
    """A SparK task whose micro-batches carry their masks in the labels' place."""

    def __init__(self, model):
        self.model = model

    def loss(self, images, active, generator):
        return self.model(images, active)


def _train(name: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    cfg, model, frozen, optimizer = _setup(name, world_size)
    env = init_distributed("cpu") if world_size > 1 else DistEnv()
    ddp = wrap_ddp(model, env)
    share = slice(rank * PER_RANK * 2 // world_size, (rank + 1) * PER_RANK * 2 // world_size)
    fp32 = Precision("none", False, "cpu", "the runner's fp32 step")
    trainer = Trainer(_GivenMasks(ddp), optimizer, lambda step: {}, LoopSettings(1, STEPS, ACCUM, cfg.clip_grad),
                      env, fp32, RunLogger("", False, False, False), StopRequest(), lambda *a, **k: None)
    for step in range(STEPS):
        batches = [tuple(t[share] for t in _data(model, step, micro)) for micro in range(ACCUM)]
        trainer.state.step = step
        trainer.step(batches)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    try:
        results = {name: _train(name, rank, 2) for name in MODELS}
    finally:
        shutdown_distributed()
    if rank == 0:
        torch.save(results, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    """Same weights after 3 steps of 2 accumulated passes, including BatchNorm running statistics: in float64, what
    training changed in each tensor (its update, so in effect its summed gradients) agrees within 1e-9 of that
    tensor's own update, and counters exactly.

    SGD with a large lr probes the gradients linearly; Adam-type updates (m / sqrt(v)) would amplify the
    float noise of near-zero gradients.
    """
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_rank_main, args=(_free_port(), out), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    for name in MODELS:
        single = _train(name, 0, 1)
        initial = _setup(name, 1)[1].state_dict()
        assert distributed[name].keys() == single.keys()
        floats = [k for k, v in single.items() if v.is_floating_point()]
        assert_per_tensor_close({k: distributed[name][k] - initial[k] for k in floats},
                                {k: single[k] - initial[k] for k in floats}, rtol=1e-9, what=f"{name} update")
        assert all(torch.equal(distributed[name][k], v) for k, v in single.items() if k not in floats)
        moved = max((single[k] - v).abs().max().item() for k, v in initial.items() if k.endswith("weight"))
        assert moved > 1e-2  # training changed the weights


@pytest.mark.parametrize(("name", "expected"), [
    ("convnext_atto", {"encoder.model.head.norm.weight", "encoder.model.head.norm.bias"}),
    ("efficientnet_b0", {"encoder.model.conv_head.weight", "encoder.model.bn2.weight", "encoder.model.bn2.bias"}),
    ("resnet18", set()),
])
def test_unused_parameters_are_found_and_the_dry_run_leaves_no_trace(name, expected):
    torch.manual_seed(0)
    model = build_spark(name, decoder_width=64, input_size=SIZE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.randn(2, 3, SIZE, SIZE)
    rng = torch.get_rng_state()
    frozen = freeze_unused_parameters(model, probe)
    assert set(frozen) == expected
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected


def test_sync_batchnorm_keeps_keys_weights_and_single_rank_outputs():
    torch.manual_seed(0)
    model = build_spark("resnet18", decoder_width=64, input_size=SIZE)
    keys = list(model.state_dict())
    x = torch.randn(4, 3, SIZE, SIZE)
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(0))
    reference = model(x, active)
    torch.manual_seed(0)
    synced = build_spark("resnet18", decoder_width=64, input_size=SIZE)
    replaced = sync_batchnorm(synced)
    assert replaced == sum(isinstance(m, RankSyncedBatchNorm2d) for m in synced.modules()) > 0
    assert list(synced.state_dict()) == keys
    assert not any(isinstance(m, RankSyncedBatchNorm2d) for m in synced.encoder.modules())
    torch.testing.assert_close(synced(x, active), reference, atol=1e-5, rtol=1e-5)


def test_slurm_step_environment(monkeypatch):
    for key in (*TORCH_LAUNCH_VARIABLES, "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(key, "")  # recorded, so the values exported below are removed after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # left by another launch in the submitting shell: replaced
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert world_size_from_environment() == 8
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == ("5", "1", "gpu07")
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000


def test_single_process_without_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)


def test_torchrun_two_ranks_through_the_command_line(tmp_path):
    """``torchrun -m pretrain`` with 2 gloo ranks, gradient accumulation and a model with unused parameters."""
    data = make_demo_dataset(tmp_path / "demo", num_classes=2, train_per_class=8, val_per_class=1, image_size=64)
    out = tmp_path / "run"
    argv = ["--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "pretrain", "--preset", "tiny",
            "--model", "convnext_atto", "--data", str(data / "train"), "--out", str(out), "--input-size", "64",
            "--decoder-width", "64", "--batch-size", "2", "--global-batch", "8", "--epochs", "1", "--workers", "0",
            "--log-every", "1", "--no-progress"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 rank(s)" in result.stderr and "2 x 2 ranks x 2 accum" in result.stderr
    assert "head.norm.weight" in result.stderr  # reported as unused, kept out of DDP
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["grad_accum_steps"]) == (2, 2)
    assert [json.loads(line)["images_seen"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [8, 16]
    assert json.loads((out / "result.json").read_text())["metrics"]["iterations"] == 2
