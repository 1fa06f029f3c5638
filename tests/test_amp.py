"""Mixed precision and memory format keep the SparK loss (performance defaults must not change results)."""

import pytest
import torch

from pretrain.spark import build_spark


def fp32_and_bf16_channels_last_losses(
    model: torch.nn.Module, images: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss in fp32, then (model moved to channels-last, bf16 autocast) again, with its backward run."""
    fp32 = model(images, active)
    model.to(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        bf16 = model(images.contiguous(memory_format=torch.channels_last), active)
    bf16.backward()
    return fp32, bf16


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_bf16_channels_last_loss_within_1e_2_of_fp32(name: str) -> None:
    torch.manual_seed(0)
    model = build_spark(name, decoder_width=64, input_size=64)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(0))
    fp32, bf16 = fp32_and_bf16_channels_last_losses(model, images, active)
    assert abs(bf16.item() - fp32.item()) <= 1e-2 * fp32.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


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
