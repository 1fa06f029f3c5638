"""Device checks on a CUDA GPU (skipped on machines without one, such as CI's)."""

import copy

import pytest
import timm
import torch
from test_amp import fp32_and_bf16_channels_last_losses

from pretrain.encoder import SparseEncoder
from pretrain.spark import build_spark
from pretrain.sparse import masked_batch_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Full fp32 matmuls and convolutions (no TF32) so CUDA results compare at 1e-5."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def test_cuda_batch_norm_stats_are_mean_and_biased_variance() -> None:
    x = torch.randn(8, 16, 12, 12, device="cuda") * 3 + 1
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


@pytest.mark.parametrize("name", ["resnet50", "convnext_small", "efficientnet_b0"])
def test_cuda_full_mask_equals_dense_and_masked_sites_are_zero(name: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(name, num_classes=0).cuda()
    encoder = SparseEncoder(copy.deepcopy(reference))
    x = torch.randn(8, 3, 128, 128, device="cuda")
    full = torch.ones(8, 1, 4, 4, dtype=torch.bool, device="cuda")
    for a, e in zip(encoder(x, full), reference.forward_intermediates(x, indices=4, intermediates_only=True),
                    strict=True):
        assert (a - e).abs().max() <= 1e-5 * e.abs().max()
    active = build_spark(name, decoder_width=64, input_size=128).mask(8, "cuda")
    for f in encoder(x, active):
        site = active.repeat_interleave(f.shape[-1] // 4, 2).repeat_interleave(f.shape[-1] // 4, 3)
        assert torch.all(f.masked_select(~site.expand_as(f)) == 0)


@pytest.mark.parametrize("name", ["resnet50", "convnext_small"])
def test_cuda_bf16_channels_last_loss_within_1e_2(name: str) -> None:
    torch.manual_seed(0)
    model = build_spark(name, input_size=224).cuda()
    images = torch.randn(16, 3, 224, 224, device="cuda")
    active = model.mask(16, "cuda", generator=torch.Generator("cuda").manual_seed(0))
    fp32, bf16 = fp32_and_bf16_channels_last_losses(model, images, active)
    assert abs(bf16.item() - fp32.item()) <= 1e-2 * fp32.item()


@pytest.mark.parametrize("name", ["resnet50", "convnext_small", "efficientnet_b0"])
def test_cuda_gather_backend_matches_masked(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0).cuda()
    encoders = [SparseEncoder(copy.deepcopy(model), backend=b) for b in ("masked", "gather")]
    x = torch.randn(8, 3, 128, 128, device="cuda")
    active = build_spark(name, decoder_width=64, input_size=128).mask(8, "cuda")
    masked, gather = (encoder(x, active) for encoder in encoders)
    for g, m in zip(gather, masked, strict=True):
        assert (g - m).abs().max() <= 1e-4 * m.abs().max()


def test_cuda_sparse_batch_norm_gradients_equal_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    mask = (torch.rand(4, 1, 6, 6) > 0.5).float()
    probe = torch.randn(4, 8, 6, 6)
    grads = []
    for device in ("cpu", "cuda"):
        bn = torch.nn.BatchNorm2d(8).to(device)
        inputs = (x * mask).to(device).requires_grad_(True)
        out = masked_batch_norm(bn, inputs, mask.to(device))
        wanted = [inputs, bn.weight, bn.bias]
        grads.append([t.cpu() for t in torch.autograd.grad((out * probe.to(device)).sum(), wanted)])
    for on_cuda, on_cpu in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-5, atol=1e-5)
