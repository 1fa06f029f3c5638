"""End to end: the session's tiny SparK pretraining -> Detectron2 Mask R-CNN fine-tuning (timm backbone) ->
result.json with pycocotools numbers -> one-off evaluation; stop signals and --resume; bf16 training with fp32
evaluation, precise BN; one-line errors of train and evaluate (exit 2 for usage, 1 for runtime errors); the
Detectron2 install tool."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from downstream.det.data import DetDemoSpec, coco_split_paths, make_det_demo
from downstream.det.evaluate import main as evaluate_main
from downstream.det.train import main as train_main
from downstream.det.train import run as train_run
from pretrain.runtime.errors import UsageError
from pretrain.runtime.precision import Precision
from pretrain.runtime.result import read_result
from pretrain.runtime.signals import StopRequest

REPO = Path(__file__).resolve().parents[1]
PIXELS = 64
TINY = ["--config", "tiny", "INPUT.MIN_SIZE_TRAIN", f"({PIXELS},)", "INPUT.MAX_SIZE_TRAIN", str(PIXELS),
        "INPUT.MIN_SIZE_TEST", str(PIXELS), "INPUT.MAX_SIZE_TEST", str(PIXELS), "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2"]
METRICS = [f"{task}_{name}" for task in ("bbox", "segm") for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")]


@pytest.fixture(scope="module")
def spark(spark_run) -> Path:
    """The session's SparK pretraining (resnet18, 64 px, 12 steps): its checkpoint-last.pth."""
    return spark_run / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_det_demo(tmp_path_factory.mktemp("coco") / "demo", DetDemoSpec(8, 4, PIXELS))


def _train(spark: Path, coco: Path, out: Path, *extra: str, stop: StopRequest | None = None):
    return train_run([*TINY, "--weights", str(spark), "--out", str(out), "--coco-root", str(coco), *extra], stop=stop)


@pytest.fixture(scope="module")
def finished(spark, coco, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det") / "run"
    assert _train(spark, coco, out, "SOLVER.MAX_ITER", "4").status == "completed"
    return out


def test_fine_tuning_from_a_spark_checkpoint_writes_pycocotools_results(finished, spark, coco):
    result = read_result(finished)
    assert result.stage == "det" and result.model == "resnet18" and result.inputs["weights"] == str(spark)
    assert result.config["detectron2"]["SOLVER"]["MAX_ITER"] == 4 and result.config["precision"]["amp"] in (
        "bf16", "none")
    assert set(METRICS) <= result.metrics.keys()
    assert all(v is None or 0.0 <= v <= 100.0 for v in (result.metrics[k] for k in METRICS))
    for name in ("config.yaml", "config.json", "metrics.jsonl", "checkpoint-last.pth", "model_final.pth"):
        assert (finished / name).is_file(), name
    # The numbers are pycocotools' own: recompute them from the saved predictions.
    ground_truth = COCO(str(coco_split_paths(coco, "val2017")[0]))
    predictions = json.loads((finished / "inference/coco_2017_val/coco_instances_results.json").read_text())
    assert predictions
    for task in ("bbox", "segm"):
        dropped = "bbox" if task == "segm" else ""  # as Detectron2 does before evaluating masks
        results = [{k: v for k, v in p.items() if k != dropped} for p in predictions]
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), task)
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        assert result.metrics[f"{task}_AP"] == pytest.approx(100 * evaluation.stats[0], abs=1e-3)
    iterations = [json.loads(line).get("iteration") for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert 3 in iterations
    final = torch.load(finished / "model_final.pth", weights_only=True)
    assert final["iteration"] == 3 and any(k.startswith("backbone.bottom_up.model.layer4") for k in final["model"])


def test_one_off_evaluation_reproduces_the_run(finished, coco, tmp_path, capsys):
    assert evaluate_main(["--weights", str(finished / "model_final.pth"), "--coco-root", str(coco),
                          "--out", str(tmp_path)]) == 0
    assert "bbox" in capsys.readouterr().out
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["metrics"] == {k: read_result(finished).metrics[k] for k in METRICS}
    assert evaluation["config"] == str(finished / "config.yaml") and evaluation["images"] == 4


class StopAfter(StopRequest):
    """A stop request that turns on at the ``checks``-th poll (the trainer polls once per iteration)."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.left = checks

    @property
    def requested(self) -> bool:
        self.left -= 1
        if self.left < 0:
            self.request("test")
        return self.signal_name is not None


def test_stop_saves_the_last_iteration_and_resume_continues(spark, coco, tmp_path):
    out = tmp_path / "run"
    outcome = _train(spark, coco, out, "SOLVER.MAX_ITER", "4", stop=StopAfter(2))
    assert outcome.status == "stopped" and outcome.signal_name == "test" and not (out / "result.json").exists()
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["trainer"]["iteration"] == 1
    with pytest.raises(UsageError, match="already holds .*checkpoint-last.pth; pass --resume"):
        _train(spark, coco, out, "SOLVER.MAX_ITER", "4")
    assert _train(spark, coco, out, "SOLVER.MAX_ITER", "4", "--resume").status == "completed"
    steps = [json.loads(line).get("iteration") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and read_result(out).metrics["bbox_AP"] is not None


def test_sigusr1_stops_a_run_cleanly_and_resume_finishes_it(coco, tmp_path):
    out = tmp_path / "run"

    def send_when_started() -> None:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send_when_started, daemon=True).start()
    outcome = train_run([*TINY, "--weights", "none", "--out", str(out), "--coco-root", str(coco),
                         "SOLVER.MAX_ITER", "10000"])
    assert outcome.status == "stopped" and outcome.signal_name == "SIGUSR1"
    done = torch.load(out / "checkpoint-last.pth", weights_only=False)["trainer"]["iteration"]
    outcome = train_run([*TINY, "--weights", "none", "--out", str(out), "--coco-root", str(coco), "--resume", "auto",
                         "SOLVER.MAX_ITER", str(done + 2)])
    assert outcome.status == "completed" and read_result(out).inputs["weights"] == "none"


def test_two_cpu_ranks_from_torchrun_train_without_spawning(coco, tmp_path):
    """Ranks from the environment (torchrun here; a SLURM step likewise): gloo, Detectron2's local group set up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "downstream.det.train", *TINY, "--weights", "none", "--out", str(out), "--coco-root", str(coco),
               "SOLVER.MAX_ITER", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 2 iterations") == 1  # the main rank reports
    result = read_result(out)
    assert result.config["world_size"] == 2 and result.metrics["bbox_AP"] is not None
    assert result.config["detectron2"]["MODEL"]["DEVICE"] == "cpu"


@pytest.mark.parametrize("case, expected, code", [  # data and weights that fail at run time: 1; bad flags: 2
    ("no-coco", "COCO folder not found", 1),
    ("no-annotations", "annotation file not found", 1),
    ("missing-images", "images listed in", 1),
    ("weights-misfit", "does not fit the config's model", 1),
    ("no-weights", "--weights file not found", 2),
    ("no-config", "no config.yaml beside", 2),
])
def test_evaluation_errors_are_one_line(finished, coco, tmp_path, capsys, case, expected, code):
    weights, root, extra = finished / "model_final.pth", coco, []
    if case == "no-coco":
        root = tmp_path / "absent"
    elif case == "no-annotations":
        extra = ["--split", "test2017"]
    elif case == "missing-images":
        root = tmp_path / "copy"
        root.mkdir()
        (root / "annotations").symlink_to(coco / "annotations")
        (root / "val2017").mkdir()
    elif case == "weights-misfit":
        extra = ["MODEL.FPN.OUT_CHANNELS", "32"]  # the tiny config has 64
    elif case == "no-weights":
        weights = tmp_path / "absent.pth"
    elif case == "no-config":
        weights = tmp_path / "model_final.pth"
        weights.write_bytes((finished / "model_final.pth").read_bytes())
    argv = ["--weights", str(weights), "--coco-root", str(root), "--out", str(tmp_path / "eval"), *extra]
    try:
        exit_code = evaluate_main(argv)
    except SystemExit as exit_info:  # usage errors exit like argparse's
        exit_code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert (exit_code, len(err)) == (code, 1) and expected in err[0], err


@pytest.mark.parametrize("argv, expected", [
    (["--config", "nope", "--weights", "none", "--out", "{out}"], "unknown config 'nope'"),
    (["--config", "tiny", "--weights", "{out}/absent.pth", "--out", "{out}"], "--weights file not found"),
    (["--config", "tiny", "--weights", "none", "--out", "{out}", "SOLVER.MAX_ITER"], "KEY VALUE pairs"),
])
def test_training_usage_errors_are_one_line(tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        train_main([a.format(out=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and expected in err[0], err


def _exit_code(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:  # usage errors exit like argparse's
        return exit_info.code


@pytest.mark.parametrize("case, extra, expected, code", [
    ("no-coco", ["--coco-root", "{tmp}/nope-coco"], "COCO folder not found: {tmp}/nope-coco", 1),
    ("class-count", ["--coco-root", "{coco}", "MODEL.ROI_HEADS.NUM_CLASSES", "5"],
     "MODEL.ROI_HEADS.NUM_CLASSES is 5 but the data has 3 categories in coco_2017_train", 2),
])
def test_training_data_errors_come_before_training(coco, tmp_path, capsys, case, extra, expected, code):
    out = tmp_path / "run"
    argv = [*TINY, "--weights", "none", "--out", str(out), *[a.format(tmp=tmp_path, coco=coco) for a in extra]]
    assert _exit_code(train_main, argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected.format(tmp=tmp_path) in err[0], err
    assert not (out / "checkpoint-last.pth").exists()


def test_images_per_batch_must_divide_by_the_ranks(capsys):
    """Resolved for the ranks it will run on (``--world-size``): 2 images per batch split over 2 ranks, not 3."""
    argv = [*TINY, "--weights", "none", "--out", "unused", "--amp", "none", "--print-config"]
    assert _exit_code(train_main, [*argv, "--world-size", "3"]) == 2
    assert "SOLVER.IMS_PER_BATCH 2 is not divisible by 3 ranks" in capsys.readouterr().err
    assert train_run([*argv, "--world-size", "2"]).status == "printed"
    assert json.loads(capsys.readouterr().out)["detectron2"]["SOLVER"]["IMS_PER_BATCH"] == 2


def _one_image(with_instances: bool) -> dict:
    import numpy as np
    from detectron2.structures import Boxes, Instances, PolygonMasks

    image = {"image": torch.rand(3, PIXELS, PIXELS) * 255, "height": PIXELS, "width": PIXELS}
    if with_instances:
        instances = Instances((PIXELS, PIXELS))
        instances.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
        instances.gt_classes = torch.tensor([1])
        instances.gt_masks = PolygonMasks([[np.array([8, 8, 40, 8, 40, 40, 8, 40], dtype=np.float64)]])
        image["instances"] = instances
    return image


def test_bf16_trains_the_forward_and_evaluates_in_fp32():
    """The training step runs the forward under the run's bf16 autocast; evaluation, outside the step, in fp32."""
    from detectron2.utils.events import EventStorage

    from downstream.det.config import adapt_to_run, load_config
    from downstream.det.engine import DetTrainer, PrecisionTrainer

    cfg = load_config("tiny")
    adapt_to_run(cfg, 1, "cpu")
    model = DetTrainer.build_model(cfg)
    seen = []
    model.backbone.register_forward_hook(lambda m, a, out: seen.append(next(iter(out.values())).dtype))
    model.train()
    bf16 = Precision(amp="bf16", channels_last=False, device_type="cpu", reason="the test asks for it")
    step = PrecisionTrainer(model, [[_one_image(True)]], torch.optim.SGD(model.parameters(), lr=0.0), bf16,
                            torch.device("cpu"))
    with EventStorage() as storage:  # Detectron2's training forward logs into one
        step.run_step()
    assert seen == [torch.bfloat16] and math.isfinite(storage.history("total_loss").latest())
    model.eval()
    with torch.no_grad():
        model([_one_image(False)])
    assert seen == [torch.bfloat16, torch.float32]


def test_precise_bn_recomputes_the_statistics_before_evaluating(coco, tmp_path):
    from detectron2.engine import hooks

    from downstream.det.config import adapt_to_run, load_config
    from downstream.det.data import register_coco_split
    from downstream.det.engine import DetTrainer

    for name in ("mask_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_FPN_2x", "mask_rcnn_R_50_FPN_1x_published"):
        assert load_config(name).TEST.PRECISE_BN.ENABLED, name  # the table-9 configs recompute BN statistics
    assert not load_config("mask_rcnn_convnext_base_FPN_3x").TEST.PRECISE_BN.ENABLED
    for split in ("train2017", "val2017"):
        register_coco_split(f"coco_2017_{split[:-4]}", *coco_split_paths(coco, split))
    cfg = load_config("tiny", [*TINY[2:], "TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.NUM_ITER", "2",
                               "DATALOADER.NUM_WORKERS", "0"])
    adapt_to_run(cfg, 1, "cpu")
    cfg.OUTPUT_DIR = str(tmp_path)
    trainer = DetTrainer(cfg, Precision(amp="none", channels_last=False, device_type="cpu", reason="test"),
                         StopRequest())
    kinds = [type(h) for h in trainer._hooks]
    assert hooks.PreciseBN in kinds and kinds.index(hooks.PreciseBN) < kinds.index(hooks.EvalHook)
    precise = trainer._hooks[kinds.index(hooks.PreciseBN)]
    bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    precise.update_stats()
    assert not torch.equal(bn.running_mean, before) and torch.isfinite(bn.running_mean).all()


def _fake_python(folder: Path, script: str) -> str:
    path = folder / "python"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_install_tool_checks_and_leaves_an_existing_detectron2_alone(tmp_path, capsys):
    from downstream.det.install import main as install_main

    assert install_main(["--check"]) == 0 and install_main([]) == 0  # present: nothing installed
    assert "already imports; left untouched" in capsys.readouterr().out
    absent = _fake_python(tmp_path, f'exec {sys.executable} -S "$@"')  # no site-packages: no detectron2
    assert install_main(["--check", "--python", absent]) == 1
    assert "detectron2 is not installed" in capsys.readouterr().err
    (tmp_path / "broken" / "detectron2").mkdir(parents=True)
    (tmp_path / "broken" / "detectron2" / "__init__.py").write_text("raise ImportError('half installed')\n")
    broken = _fake_python(tmp_path, f'PYTHONPATH={tmp_path / "broken"} exec {sys.executable} "$@"')
    assert install_main(["--python", broken]) == 1  # reported, not replaced
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fails to import (ImportError: half installed); not replacing it" in err[0]
