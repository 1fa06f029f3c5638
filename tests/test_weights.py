"""The one weights reader (``pretrain.weights``): every layout it accepts, built here from small models (resnet18,
convnext_atto), read through every entry point (the reader, ``downstream.convert timm|detectron2|hf``, fine-tuning's
and detection's weight loading, ``pretrain.visualize``); the files timm reads (``encoder_timm.pth`` through timm's
own loaders, a Hugging Face folder round trip, offline); and bad files (unknown layout, another architecture,
truncated, a pickle that would run code): one line each, nothing written, nothing run.

The layouts the SparK authors released are made here the way their code wrote them: the encoder's timm state dict
(``*_timm_style.pth``, also wrapped in ``module``), the official ConvNeXt naming (made by inverting timm's mapping,
checked to come back through timm's own filter), and the spark-style file with decoder, whose names follow the
published SparK model (``sparse_encoder.sp_cnn``, ``dense_decoder.dec.I.up_sample|conv.J``, ``densify_norms``,
``densify_projs``, ``mask_tokens``, a ``config`` entry) independently of the reader's own mapping table.
"""

import argparse
import logging
import os
import pickle
import re
import types
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from downstream.cls.model import load_pretrained
from downstream.convert.__main__ import main as convert_main
from downstream.det.config import adapt_to_run, load_config
from downstream.det.weights import load_detection_weights
from pretrain.checkpoint import encoder_payload
from pretrain.data import make_demo_dataset
from pretrain.runtime.checkpoint import capture_rng
from pretrain.spark import build_spark
from pretrain.visualize import main as visualize_main
from pretrain.weights import (
    TRUST_FLAG,
    WeightsError,
    build_spark_model,
    load_spark_weights,
    read_weights,
)
from pretrain.weights.suite import ENCODER_PREFIX

SIZE = 64
CONFIGS = {  # build_spark arguments of the two small SparK models (ConvNeXt with the published projections)
    "resnet18": {"decoder_width": 64, "input_size": SIZE, "densify_norm": "bn", "mask_ratio": 0.6},
    "convnext_atto": {"decoder_width": 320, "input_size": SIZE, "densify_norm": "ln", "mask_ratio": 0.6,
                      "densify_proj": "published"},
}
# The published SparK model's decoder-side names for this suite's (written from the published module structure:
# UNetBlock = up_sample + conv Sequential(conv, BN, ReLU6, conv, BN); SparK.densify_norms/projs, mask_tokens).
PUBLISHED_NAMES = (
    (r"decoder\.blocks\.(\d+)\.0\.", r"dense_decoder.dec.\1.up_sample."),
    (r"decoder\.blocks\.(\d+)\.1\.", r"dense_decoder.dec.\1.conv.0."),
    (r"decoder\.blocks\.(\d+)\.2\.", r"dense_decoder.dec.\1.conv.1."),
    (r"decoder\.blocks\.(\d+)\.4\.", r"dense_decoder.dec.\1.conv.3."),
    (r"decoder\.blocks\.(\d+)\.5\.", r"dense_decoder.dec.\1.conv.4."),
    (r"decoder\.proj\.", "dense_decoder.proj."),
    (r"densify\.(\d+)\.norm\.", r"densify_norms.\1."),
    (r"densify\.(\d+)\.proj\.", r"densify_projs.\1."),
    (r"densify\.(\d+)\.mask_token", r"mask_tokens.\1"),
)


class Note:
    """A harmless class of this module: a file holding one needs full unpickling (``--trust-weights``)."""


def _official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ConvNeXt names -> the official repository's (timm's checkpoint_filter_fn inverted); no head, as the
    published SparK ConvNeXt (num_classes=0) has none."""
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        out[key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")] = value
    return out


def _published(spark: torch.nn.Module, name: str) -> dict:
    """The published SparK code's ``*_withdecoder_1kpretrained_spark_style.pth`` content for ``spark``."""
    encoder = {k: v for k, v in spark.encoder_state_dict().items() if not k.startswith("head.")}
    if name.startswith("convnext"):
        encoder = _official_names(encoder)
    module = {f"sparse_encoder.sp_cnn.{k}": v for k, v in encoder.items()}
    for key, value in spark.state_dict().items():
        if key.startswith(ENCODER_PREFIX):
            continue
        for pattern, template in PUBLISHED_NAMES:
            key = re.sub(pattern, template, key)
        module[key] = value
    config = CONFIGS[name]
    module.update({"imn_m": torch.zeros(1, 3, 1, 1), "imn_s": torch.ones(1, 3, 1, 1),
                   "norm_black": torch.zeros(1, 3, SIZE, SIZE),
                   "config": {"mask_ratio": config["mask_ratio"], "densify_norm_str": config["densify_norm"],
                              "sbn": False, "hierarchy": 4, "sparse_encoder.input_size": SIZE,
                              "dense_decoder.width": config["decoder_width"]}})
    return {"args": "Namespace(model=..., bs=4096)", "input_size": SIZE, "arch": name, "epoch": 1599,
            "performance_desc": "0.5 0.5", "module": module,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}, "is_pretrain": True}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every float tensor moved off its initialisation, so equality checks mean something."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def sparks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: _perturbed(build_spark(name, **config)) for name, config in CONFIGS.items()}


def _classifier(spark: torch.nn.Module, name: str, classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A ``classes``-way timm classifier of ``name`` whose encoder is ``spark``'s (as fine-tuning would start)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=classes)
    model.load_state_dict(spark.encoder_state_dict(), strict=False)
    return model.state_dict()


@pytest.fixture(scope="module")
def layouts(sparks, tmp_path_factory) -> dict[str, tuple[Path, str, str]]:
    """``{case: (file, model, layout the reader must report)}``, one file per layout and model."""
    folder = tmp_path_factory.mktemp("layouts")
    r18, cnx = sparks["resnet18"], sparks["convnext_atto"]
    head_r18 = _classifier(r18, "resnet18", 5, 0)
    files = {
        "pretraining": ("resnet18", "spark-pretraining",
                        {"model": r18.state_dict(), "epoch": 1, "rng": capture_rng(),
                         "config": {"model": "resnet18", **CONFIGS["resnet18"], "masking": "sparse", "epochs": 1}}),
        "encoder-r18": ("resnet18", "encoder-timm", encoder_payload(r18.encoder_state_dict(), "resnet18", {})),
        "encoder-cnx": ("convnext_atto", "encoder-timm",
                        encoder_payload(cnx.encoder_state_dict(), "convnext_atto", {})),
        "timm-checkpoint": ("resnet18", "timm-checkpoint",
                            {"epoch": 3, "arch": "resnet18", "state_dict": head_r18, "optimizer": {},
                             "state_dict_ema": _classifier(r18, "resnet18", 5, 1),
                             "args": argparse.Namespace(model="resnet18", lr=0.1, num_classes=5)}),
        "finetuning": ("resnet18", "spark-finetuning",
                       {"stage": "cls", "model": head_r18, "epoch": 2, "rng": capture_rng(),
                        "ema": {"ema0.99": {"module." + k: v for k, v in head_r18.items()}},
                        "config": {"model": "resnet18", "recipe": "tiny"}}),
        "timm-style": ("resnet18", "state-dict", r18.encoder_state_dict()),
        "wrapped": ("resnet18", "wrapped", {"module": r18.encoder_state_dict()}),
        "official-cnx": ("convnext_atto", "convnext-official", _official_names(cnx.encoder_state_dict())),
        "spark-style-r18": ("resnet18", "spark-style", _published(r18, "resnet18")),
        "spark-style-cnx": ("convnext_atto", "spark-style", _published(cnx, "convnext_atto")),
        "detectron2-model": ("resnet18", "detectron2-model",
                             {"model": {**{f"backbone.bottom_up.model.{k}": v for k, v in
                                           r18.encoder_state_dict().items()},
                                        "roi_heads.box_predictor.cls_score.weight": torch.zeros(4, 8)}}),
    }
    out = {}
    for case, (name, layout, content) in files.items():
        torch.save(content, folder / f"{case}.pth")
        out[case] = (folder / f"{case}.pth", name, layout)
    pkl = folder / "detectron2.pkl"
    assert convert_main(["detectron2", str(out["encoder-r18"][0]), str(pkl)]) == 0
    out["detectron2-pickle"] = (pkl, "resnet18", "detectron2-pickle")
    hub = folder / "hub-cnx"
    assert convert_main(["hf", str(out["spark-style-cnx"][0]), str(hub)]) == 0
    out["hf-folder"] = (hub, "convnext_atto", "hf-folder")
    return out


def _model_needed(case: str) -> list[str]:
    return ["--model", "convnext_atto"] if case == "official-cnx" else []  # convnext_atto is no suite architecture


def _encoder(sparks, name: str) -> dict[str, torch.Tensor]:
    return sparks[name].encoder_state_dict()


def _equal_where_present(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], skip=()):
    """Every key of ``expected`` but ``skip`` is in ``state`` with the same value."""
    missing = [k for k in expected if k not in state and k not in skip]
    assert not missing, missing
    assert all(torch.equal(state[k], v) for k, v in expected.items() if k not in skip)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


ALL = ["pretraining", "encoder-r18", "encoder-cnx", "timm-checkpoint", "finetuning", "timm-style", "wrapped",
       "official-cnx", "spark-style-r18", "spark-style-cnx", "detectron2-model", "detectron2-pickle", "hf-folder"]
HEAD_NORM = ("head.norm.weight", "head.norm.bias")  # ConvNeXt keys after the last stage that released files lack
LACKING = {"official-cnx": HEAD_NORM, "spark-style-cnx": HEAD_NORM}  # so the reader reports them missing
UNTRAINED = {**LACKING, "hf-folder": HEAD_NORM}  # the Hub folder of spark-style-cnx holds them at initialisation


def test_official_naming_comes_back_through_timms_filter(sparks):
    from timm.models.convnext import checkpoint_filter_fn

    encoder = _encoder(sparks, "convnext_atto")
    official = _official_names(encoder)
    assert {"downsample_layers.0.0.weight", "downsample_layers.1.1.weight", "stages.1.0.dwconv.weight",
            "stages.1.0.pwconv1.weight", "stages.3.1.gamma"} <= official.keys()
    assert not any(k.startswith(("stem.", "head.")) or ".blocks." in k for k in official)
    with torch.device("meta"):
        model = timm.create_model("convnext_atto", num_classes=0)
    back = checkpoint_filter_fn(official, model)
    assert back.keys() == {k for k in encoder if not k.startswith("head.")}
    assert all(torch.equal(back[k], encoder[k]) for k in back)


@pytest.mark.parametrize("case", ALL)
def test_the_reader_identifies_every_layout_and_returns_timm_weights(layouts, sparks, case, caplog):
    path, name, layout = layouts[case]
    with caplog.at_level(logging.INFO, logger="pretrain.weights.reader"):
        weights = read_weights(path, "convnext_atto" if case == "official-cnx" else None)
    assert (weights.layout, weights.model_name) == (layout, name)
    assert f"{layout} layout" in caplog.text and str(path) in caplog.text
    assert weights.missing == LACKING.get(case, ())
    _equal_where_present(weights.state_dict, _encoder(sparks, name), UNTRAINED.get(case, ()))
    assert not any(k.startswith(("fc.", "head.fc.")) for k in weights.state_dict) or case in (
        "timm-checkpoint", "finetuning")  # a fresh classifier (encoder files) is left out, a trained one kept
    if case in ("timm-checkpoint", "finetuning"):
        assert set(weights.variants) == {"timm-checkpoint": {"state_dict_ema"}, "finetuning": {"ema0.99"}}[case]
        assert all(v.keys() == weights.state_dict.keys() for v in weights.variants.values())  # EMAs named alike
    if case in ("pretraining", "spark-style-r18", "spark-style-cnx"):
        decoder = {k: v for k, v in sparks[name].state_dict().items() if not k.startswith(ENCODER_PREFIX)}
        assert weights.decoder.keys() == decoder.keys()
        assert all(torch.equal(weights.decoder[k], v) for k, v in decoder.items())


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_a_spark_style_file_rebuilds_the_spark_model_it_came_from(layouts, sparks, name):
    """The released file's decoder lands where it belongs: the same state and the same reconstructions."""
    weights = read_weights(layouts[{"resnet18": "spark-style-r18", "convnext_atto": "spark-style-cnx"}[name]][0])
    model, settings = build_spark_model(weights)
    original = sparks[name]
    assert settings == {"model": name, "input_size": SIZE, "hierarchy": True, **CONFIGS[name],
                        "densify_proj": "published"}
    state = model.state_dict()
    for key, value in original.state_dict().items():
        if key[len(ENCODER_PREFIX):] not in HEAD_NORM:
            assert torch.equal(state[key], value), key
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    active = original.mask(2, "cpu", generator=torch.Generator().manual_seed(0))
    ours, theirs = model.reconstruct(images, active), original.reconstruct(images, active)
    assert torch.allclose(ours.prediction, theirs.prediction, atol=1e-5)


def test_an_encoder_only_file_starts_a_spark_model_without_its_decoder(layouts, sparks):
    weights = read_weights(layouts["timm-style"][0])
    torch.manual_seed(3)
    model = build_spark("resnet18", **CONFIGS["resnet18"])
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(ENCODER_PREFIX)}
    loaded = load_spark_weights(model, weights, require_decoder=False)
    assert sorted(loaded.missing) == sorted(before) and not loaded.dropped
    assert all(torch.equal(model.state_dict()[ENCODER_PREFIX + k], v) for k, v in _encoder(sparks, "resnet18").items())
    with pytest.raises(WeightsError, match="holds no SparK decoder"):
        load_spark_weights(model, weights)


@pytest.mark.parametrize("case", ALL)
def test_convert_timm_from_every_layout_loads_through_timm(layouts, sparks, case, tmp_path, capsys):
    path, name, layout = layouts[case]
    dst = tmp_path / "out.pth"
    assert convert_main(["timm", str(path), str(dst), *_model_needed(case)]) == 0
    assert f"from a {layout} file" in capsys.readouterr().out
    saved = torch.load(dst, weights_only=True)
    head = ["fc.bias", "fc.weight"] if name == "resnet18" else ["head.fc.bias", "head.fc.weight"]
    assert saved["model_name"] == name and saved["meta"]["untrained"] == sorted(head + list(LACKING.get(case, ())))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(dst)})  # 1000 classes
    _equal_where_present(model.state_dict(), _encoder(sparks, name), UNTRAINED.get(case, ()))
    assert model.num_classes == 1000


@pytest.mark.parametrize("case", [c for c in ALL if c not in ("encoder-cnx", "official-cnx", "spark-style-cnx",
                                                                "hf-folder")])
def test_convert_detectron2_from_every_resnet_layout(layouts, sparks, case, tmp_path, capsys):
    dst = tmp_path / "r18.pkl"
    assert convert_main(["detectron2", str(layouts[case][0]), str(dst)]) == 0
    assert "tensors of a ResNet-18" in capsys.readouterr().out
    back = read_weights(dst)  # the pickle's ResNet names map back to timm's
    assert back.layout == "detectron2-pickle" and back.model_name == "resnet18"
    _equal_where_present(back.state_dict, _encoder(sparks, "resnet18"))


@pytest.mark.parametrize("case", ["official-cnx", "spark-style-cnx"])
def test_convert_detectron2_refuses_a_convnext_in_one_line(layouts, case, tmp_path, capsys):
    dst = tmp_path / "cnx.pkl"
    assert convert_main(["detectron2", str(layouts[case][0]), str(dst), *_model_needed(case)]) == 1
    assert "keys have no Detectron2 ResNet name" in _one_line(capsys) and not dst.exists()


@pytest.mark.parametrize("case", ["encoder-r18", "official-cnx", "spark-style-cnx", "detectron2-pickle"])
def test_hugging_face_folder_round_trip_offline(layouts, sparks, case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, name, _ = layouts[case]
    hub = tmp_path / "hub"
    assert convert_main(["hf", str(path), str(hub), *_model_needed(case)]) == 0
    assert sorted(p.name for p in hub.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed
    import json

    config = json.loads((hub / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 0
    assert config["pretrained_cfg"]["tag"] == "spark" and "mean" in config["pretrained_cfg"]
    headless = timm.create_model(f"local-dir:{hub}", pretrained=True)
    assert headless.num_classes == 0
    _equal_where_present(headless.state_dict(), _encoder(sparks, name), HEAD_NORM)
    classifier = timm.create_model(f"local-dir:{hub}", pretrained=True, num_classes=5)
    _equal_where_present(classifier.state_dict(), _encoder(sparks, name), HEAD_NORM)
    again = read_weights(hub)
    assert again.layout == "hf-folder" and again.model_name == name
    _equal_where_present(again.state_dict, _encoder(sparks, name), HEAD_NORM)


@pytest.mark.parametrize("case", ["encoder-r18", "official-cnx"])
def test_timm_file_loads_through_timms_own_loaders(layouts, sparks, case, tmp_path):
    """The converter's output (encoder_timm.pth's format) through every way timm starts from a file."""
    path, name, _ = layouts[case]
    dst = tmp_path / "timm.pth"
    assert convert_main(["timm", str(path), str(dst), *_model_needed(case)]) == 0
    encoder = _encoder(sparks, name)
    lacking = HEAD_NORM if case == "official-cnx" else ()
    # timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": PATH}) at the default 1000 classes
    default = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(dst)})
    _equal_where_present(default.state_dict(), encoder, lacking)
    # train.py --initial-checkpoint PATH: timm.models.load_checkpoint(model, PATH), strict, 1000 classes
    initial = timm.create_model(name)
    timm.models.load_checkpoint(initial, str(dst), strict=True)
    assert all(torch.equal(initial.state_dict()[k], v) for k, v in default.state_dict().items())
    via_factory = timm.create_model(name, checkpoint_path=str(dst))
    assert all(torch.equal(via_factory.state_dict()[k], v) for k, v in default.state_dict().items())
    # train.py --pretrained --pretrained-path PATH --num-classes 7: the overlay train.py builds (head adapted)
    adapted = timm.create_model(name, pretrained=True, num_classes=7,
                                pretrained_cfg_overlay={"file": str(dst), "num_classes": -1})
    _equal_where_present(adapted.state_dict(), encoder, lacking)
    assert adapted.get_classifier().out_features == 7
    headless = timm.create_model(name, num_classes=0).load_state_dict(torch.load(dst)["state_dict"], strict=False)
    assert not headless.missing_keys and all(k.startswith(("fc.", "head.fc.")) for k in headless.unexpected_keys)


@pytest.mark.parametrize("case", ALL)
def test_fine_tuning_weights_from_every_layout(layouts, sparks, case):
    path, name, _ = layouts[case]
    model = timm.create_model(name, num_classes=3)
    cfg = types.SimpleNamespace(weights=str(path), model=name, trust_weights=False)
    described = load_pretrained(model, cfg)
    head = {"resnet18": ("fc.weight", "fc.bias"), "convnext_atto": ("head.fc.weight", "head.fc.bias")}[name]
    assert f"(new classifier): {', '.join(LACKING.get(case, ()) + head)}" in described
    _equal_where_present(model.state_dict(), _encoder(sparks, name), UNTRAINED.get(case, ()))


@pytest.fixture(scope="module")
def detectors():
    """Detection models of the tiny config: timm resnet18 and convnext_atto backbones, Detectron2's ResNet-18."""
    from detectron2.modeling import build_model  # after downstream.det (imported above): its shims come first

    models = {}
    for key, overrides in {"resnet18": [], "convnext_atto": ["MODEL.TIMM.NAME", "convnext_atto"],
                           "d2-resnet18": ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH",
                                           "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]}.items():
        cfg = load_config("tiny", overrides)
        adapt_to_run(cfg, 1, "cpu")
        models[key] = build_model(cfg)
    return models


@pytest.mark.parametrize("case", [c for c in ALL if c not in ("hf-folder", "detectron2-pickle")])
def test_detection_weights_from_every_layout(layouts, sparks, detectors, case):
    """Into the timm FPN backbone (the Detectron2 pickle goes to Detectron2's ResNet, below; --weights takes files,
    so a Hub folder converts first)."""
    path, name, layout = layouts[case]
    model = detectors[name]
    report = load_detection_weights(model, str(path))
    assert layout in report.kind
    backbone = {k[len("backbone.bottom_up.model."):]: v for k, v in model.state_dict().items()
                if k.startswith("backbone.bottom_up.model.")}
    _equal_where_present(backbone, {k: v for k, v in _encoder(sparks, name).items() if not k.startswith("head.")})


@pytest.mark.parametrize("case", ["spark-style-r18", "pretraining", "detectron2-pickle"])
def test_detectrons_own_resnet_takes_the_renamed_encoder(layouts, sparks, detectors, case):
    model = detectors["d2-resnet18"]
    report = load_detection_weights(model, str(layouts[case][0]))
    assert report.loaded == len(_encoder(sparks, "resnet18"))
    encoder = _encoder(sparks, "resnet18")
    bottom_up = model.backbone.bottom_up
    assert torch.equal(bottom_up.res4[1].conv2.weight, encoder["layer3.1.conv2.weight"])
    assert torch.equal(bottom_up.stem.conv1.norm.running_var, encoder["bn1.running_var"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = make_demo_dataset(tmp_path_factory.mktemp("images") / "demo", num_classes=2, train_per_class=1,
                             val_per_class=2, image_size=72)
    return root / "val"


@pytest.mark.parametrize("case", ["spark-style-r18", "spark-style-cnx"])  # checkpoint-last.pth: test_visualize
def test_visualize_draws_figure_4_from_every_layout_with_a_decoder(layouts, images, case, tmp_path, capsys):
    out = tmp_path / "recon.png"
    assert visualize_main(["--weights", str(layouts[case][0]), "--images", str(images), "--out", str(out),
                           "--num", "2"]) == 0
    assert f"{layouts[case][1]})" in capsys.readouterr().out
    with Image.open(out) as figure:
        assert figure.format == "PNG"


@pytest.mark.parametrize("case", ["encoder-r18", "timm-style", "official-cnx", "detectron2-pickle"])
def test_visualize_names_the_missing_decoder_of_an_encoder_only_file(layouts, images, case, tmp_path, capsys):
    out = tmp_path / "recon.png"
    code = visualize_main(["--ckpt", str(layouts[case][0]), "--images", str(images), "--out", str(out)])
    line = _one_line(capsys)
    if case == "official-cnx":  # names no suite architecture, and visualize has no --model: the file's problem first
        assert code == 1 and "pass --model NAME" in line
    else:
        assert code == 1 and "holds no SparK decoder" in line
    assert not out.exists()


def test_an_architecture_is_inferred_from_keys_and_shapes_else_asked_for(layouts, capsys, tmp_path):
    assert read_weights(layouts["timm-style"][0]).model_name == "resnet18"  # a plain state dict, no name
    assert convert_main(["timm", str(layouts["official-cnx"][0]), str(tmp_path / "x.pth")]) == 1
    line = _one_line(capsys)
    assert "convnext-official; its keys and shapes match none of resnet18" in line
    assert line.endswith("names no architecture: pass --model NAME") and not (tmp_path / "x.pth").exists()


# --- bad files: one line, nothing written, nothing run


@pytest.fixture(scope="module")
def bad(layouts, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """``{case: (file, what its one-line error says)}``; the pickles would create ``MARKER`` if unpickled."""
    folder = tmp_path_factory.mktemp("bad")
    marker = folder / "MARKER"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"format": "mine", "tensors": [1, 2, 3]}, folder / "unknown.pth")
    spark_style = torch.load(layouts["spark-style-r18"][0], weights_only=True)
    torch.save({**spark_style, "arch": "resnet50"}, folder / "other-architecture.pth")
    encoder = layouts["encoder-r18"][0].read_bytes()
    (folder / "truncated.pth").write_bytes(encoder[: len(encoder) // 3])
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "arch": Payload()}, folder / "runs-code.pth")
    with open(folder / "runs-code.pkl", "wb") as handle:
        pickle.dump({"model": {"stem.conv1.weight": Payload()}, "__author__": "x"}, handle)
    return {
        "unknown": (folder / "unknown.pth", "has no known weights layout (found keys format, tensors); accepted: "
                                            "spark-pretraining; spark-finetuning; encoder-timm"),
        "other-architecture": (folder / "other-architecture.pth", "(spark-style) does not fit timm resnet50: "),
        "truncated": (folder / "truncated.pth", "cannot read checkpoint"),
        "runs-code": (folder / "runs-code.pth", f"needs posix.system to be unpickled, which can run code from the "
                                                f"file: refused; pass {TRUST_FLAG}"),
        "runs-code-pkl": (folder / "runs-code.pkl", f"needs posix.system to be unpickled, which can run code from "
                                                    f"the file: refused; pass {TRUST_FLAG}"),
    }


def _bad_cases():
    return ["unknown", "other-architecture", "truncated", "runs-code", "runs-code-pkl"]


@pytest.mark.parametrize("target", ["timm", "detectron2", "hf"])
@pytest.mark.parametrize("case", _bad_cases())
def test_bad_files_through_the_converter(bad, case, target, tmp_path, capsys):
    path, message = bad[case]
    dst = tmp_path / ("out.pkl" if target == "detectron2" else "out")
    assert convert_main([target, str(path), str(dst)]) == 1
    line = _one_line(capsys)
    assert message in line and str(path) in line
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    assert not (path.parent / "MARKER").exists()


@pytest.mark.parametrize("case", _bad_cases())
def test_bad_files_through_fine_tuning_detection_and_visualize(bad, detectors, images, case, tmp_path, capsys):
    path, message = bad[case]
    cfg = types.SimpleNamespace(weights=str(path), model="resnet18", trust_weights=False)
    with pytest.raises(WeightsError) as error:
        load_pretrained(timm.create_model("resnet18", num_classes=3), cfg)
    expected = "holds resnet50 weights; the model is resnet18" if case == "other-architecture" else message
    assert expected in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(WeightsError) as error:
        load_detection_weights(detectors["resnet18"], str(path))
    expected = "holds resnet50 weights; the config's timm backbone is resnet18" if case == "other-architecture" \
        else message
    assert expected in str(error.value) and "\n" not in str(error.value)
    out = tmp_path / "recon.png"
    assert visualize_main(["--weights", str(path), "--images", str(images), "--out", str(out)]) == 1
    assert message in _one_line(capsys) and not out.exists()
    assert not (path.parent / "MARKER").exists()


def test_another_architecture_than_asked_is_named(layouts, detectors, capsys, tmp_path):
    assert convert_main(["timm", str(layouts["encoder-r18"][0]), str(tmp_path / "x.pth"), "--model", "resnet50"]) == 1
    assert "holds resnet18 weights, expected resnet50" in _one_line(capsys)
    assert convert_main(["timm", str(layouts["timm-style"][0]), str(tmp_path / "x.pth"), "--model", "resnet50"]) == 1
    line = _one_line(capsys)
    assert "does not fit timm resnet50: " in line and line.endswith("its keys and shapes match timm resnet18")
    cfg = types.SimpleNamespace(weights=str(layouts["spark-style-r18"][0]), model="resnet34", trust_weights=False)
    with pytest.raises(WeightsError, match="holds resnet18 weights; the model is resnet34"):
        load_pretrained(timm.create_model("resnet34", num_classes=3), cfg)
    with pytest.raises(WeightsError, match=r"holds resnet18 weights; the config's timm backbone is convnext_atto "
                                           r"\(MODEL.TIMM.NAME\)"):
        load_detection_weights(detectors["convnext_atto"], str(layouts["spark-style-r18"][0]))
    assert not (tmp_path / "x.pth").exists()


def test_trust_weights_reads_a_file_that_needs_more_than_plain_types(layouts, tmp_path, capsys):
    content = torch.load(layouts["encoder-r18"][0], weights_only=True)
    content["meta"]["note"] = Note()
    path = tmp_path / "noted.pth"
    torch.save(content, path)
    assert convert_main(["timm", str(path), str(tmp_path / "a.pth")]) == 1
    line = _one_line(capsys)
    assert "Note to be unpickled" in line and TRUST_FLAG in line and not (tmp_path / "a.pth").exists()
    assert convert_main(["timm", str(path), str(tmp_path / "a.pth"), TRUST_FLAG]) == 0
    cfg = types.SimpleNamespace(weights=str(path), model="resnet18", trust_weights=True)
    assert "loaded" in load_pretrained(timm.create_model("resnet18", num_classes=3), cfg)
