"""Mixed precision and memory format keep the SparK loss and its gradients (performance defaults must not change
results), checked against fp32 tightly enough that a sparse operator broken in bf16 would be caught.

Measured on these noised weights (64 px, batch 4, this 2-core CPU, bf16 emulated): bf16 + channels-last is 0.01%
(resnet18) and 0.08% (convnext_atto) off the fp32 loss, while zero-outing (no sparse operator at all) is 5.7% and
6.4% off it: the 0.5% tolerance lies far below that gap. Gradients, as the relative Euclidean error of each tensor:
bf16 gives medians of 0.18 and 0.12 (the largest 0.43 and 0.19: small random gradients cancel a lot), a dense
BatchNorm in the encoder 1.33, zero-outing 1.4.
"""

import copy
import statistics

import pytest
import torch
from encoder_properties import add_branch_noise
from equivalence import relative_l2_errors

from pretrain.spark import SparK, build_spark

LOSS_RTOL = 5e-3  # bf16 against fp32; zero-outing is 5.7% away (module docstring)
GRAD_MEDIAN, GRAD_MAX = 0.4, 1.0  # per-tensor relative errors of the gradients (module docstring)


def bf16_against_fp32(model: SparK, images: torch.Tensor, active: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The loss's relative difference and each parameter gradient's relative error of bf16 autocast with
    channels-last against fp32 NCHW, from copies of ``model`` on the same images and mask."""
    fp32 = copy.deepcopy(model)
    loss = fp32(images, active)
    loss.backward()
    bf16 = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        low = bf16(images.contiguous(memory_format=torch.channels_last), active)
    low.backward()
    expected = {n: p.grad for n, p in fp32.named_parameters() if p.grad is not None}
    got = dict(bf16.named_parameters())
    assert all(got[n].grad is not None and torch.isfinite(got[n].grad).all() for n in expected)
    return abs(low.item() - loss.item()) / loss.item(), relative_l2_errors({n: got[n].grad for n in expected}, expected)


def check_bf16_matches_fp32(model: SparK, images: torch.Tensor, active: torch.Tensor) -> None:
    loss_gap, errors = bf16_against_fp32(model, images, active)
    assert loss_gap <= LOSS_RTOL, f"bf16 loss {loss_gap:.2%} off fp32"
    worst = max(errors, key=errors.get)
    assert statistics.median(errors.values()) <= GRAD_MEDIAN and errors[worst] <= GRAD_MAX, \
        f"bf16 gradients: median error {statistics.median(errors.values()):.2f}, {worst} {errors[worst]:.2f}"


def noised_spark(name: str, size: int = 64, **kwargs) -> SparK:
    """A SparK model with noise on its biases, norm affines and layer scales (every branch active)."""
    torch.manual_seed(0)
    return add_branch_noise(build_spark(name, decoder_width=64, input_size=size, **kwargs), seed=1)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_bf16_channels_last_matches_fp32_loss_and_gradients(name: str) -> None:
    model = noised_spark(name)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(0))
    check_bf16_matches_fp32(model, images, active)


def test_channels_last_keeps_masked_sites_zero() -> None:
    torch.manual_seed(0)
    model = build_spark("resnet18", decoder_width=64, input_size=64).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    active = model.mask(2, "cpu", generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.encoder(images, active)
    for f in feats:
        site = active.repeat_interleave(f.shape[-1] // 2, 2).repeat_interleave(f.shape[-1] // 2, 3)
        assert torch.all(f.masked_select(~site.expand_as(f)) == 0)
