"""Atomic checkpoint writes, the .prev fallback, RNG round trips and the timm-format encoder file."""

import random

import numpy as np
import pytest
import timm
import torch

from pretrain.checkpoint import encoder_payload
from pretrain.runtime.checkpoint import CHECKPOINT, capture_rng, find_checkpoint, restore_rng, save_torch
from pretrain.runtime.io import atomic_write, atomic_write_json
from pretrain.spark import build_spark


def test_failed_write_leaves_the_old_file_intact(tmp_path):
    path = str(tmp_path / CHECKPOINT)
    save_torch(path, {"version": 1}, keep_previous=True)

    def crash_midway(handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash_midway, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert find_checkpoint(str(tmp_path)) == path


def test_previous_checkpoint_is_kept_and_used_as_fallback(tmp_path):
    path = str(tmp_path / CHECKPOINT)
    assert find_checkpoint(str(tmp_path)) is None
    save_torch(path, {"version": 1}, keep_previous=True)
    save_torch(path, {"version": 2}, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"version": 2}
    assert torch.load(path + ".prev", weights_only=True) == {"version": 1}
    (tmp_path / CHECKPOINT).unlink()  # a crash between moving the old file aside and renaming the new one
    assert find_checkpoint(str(tmp_path)) == path + ".prev"
    assert not list(tmp_path.glob("*.tmp"))


def test_atomic_json_replaces(tmp_path):
    path = str(tmp_path / "sub" / "result.json")
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert (tmp_path / "sub" / "result.json").read_text().strip().endswith("}")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["result.json"]


def test_rng_round_trip():
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move on
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_encoder_file_loads_strict_into_timm(tmp_path, name):
    """encoder_timm.pth holds every key of timm's 1000-class model: the encoder's, plus a classifier at timm's
    initialisation that meta lists as untrained; headless models load it with exactly that classifier left over."""
    spark = build_spark(name, decoder_width=64, input_size=64)
    path = str(tmp_path / "encoder_timm.pth")
    save_torch(path, encoder_payload(spark.encoder_state_dict(), spark.encoder.model_name, {"epoch": 3}))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = {"resnet18": ["fc.bias", "fc.weight"], "convnext_atto": ["head.fc.bias", "head.fc.weight"]}[name]
    assert saved["model_name"] == name and saved["meta"] == {"epoch": 3, "untrained": head}
    model = timm.create_model(saved["model_name"])
    model.load_state_dict(saved["state_dict"], strict=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in spark.encoder_state_dict().items())
    timm.models.load_checkpoint(timm.create_model(name), path, strict=True)
    headless = timm.create_model(name, num_classes=0).load_state_dict(saved["state_dict"], strict=False)
    assert not headless.missing_keys and sorted(headless.unexpected_keys) == head
