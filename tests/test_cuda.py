"""Device checks on a CUDA GPU (skipped on machines without one, such as CI's), on weights with noise on biases,
norm affines and layer scales, gradients compared tensor by tensor: the CUDA kernels of the sparse BatchNorm, the
function mode and the gather backend against the dense model and the masked backend."""

import copy

import pytest
import torch
from encoder_properties import BRANCH_NOISE, add_branch_noise, make_pair, pixel_mask
from equivalence import assert_per_tensor_close, named_gradients
from test_amp import check_bf16_matches_fp32, noised_spark
from test_gather import check_backends_agree

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


def _maps_and_gradients(model, x: torch.Tensor, active: torch.Tensor | None):
    pixels = x.clone().requires_grad_(True)
    feats = model(pixels, active) if active is not None else \
        model.forward_intermediates(pixels, indices=4, intermediates_only=True)
    sum((f * torch.randn(f.shape, generator=torch.Generator().manual_seed(i)).to(f)).sum()
        for i, f in enumerate(feats)).backward()
    grads = named_gradients(getattr(model, "model", model), pixels=pixels)
    return [f.detach() for f in feats], grads


@pytest.mark.parametrize("name", ["resnet50", "convnext_small", "efficientnet_b0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_full_mask_equals_dense_and_masked_sites_are_zero(name: str, dtype: torch.dtype) -> None:
    """Values in fp32 and float64 (1e-5 / 1e-10 of each map); gradients of every tensor in float64 (1e-8; deep fp32
    nets in training mode are 1e-2 of some tensors off their own float64 gradients, dense or sparse)."""
    reference, encoder = make_pair(name, perturb=BRANCH_NOISE)
    reference, encoder = reference.to("cuda", dtype).train(), encoder.to("cuda", dtype).train()
    x = torch.randn(8, 3, 128, 128, device="cuda", dtype=dtype)
    full = torch.ones(8, 1, 4, 4, dtype=torch.bool, device="cuda")
    (feats, grads), (expected, expected_grads) = (_maps_and_gradients(m, x, a) for m, a in ((encoder, full),
                                                                                           (reference, None)))
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_per_tensor_close(dict(enumerate(feats)), dict(enumerate(expected)), rtol, what="feature map")
    if dtype == torch.float64:
        assert_per_tensor_close(grads, expected_grads, 1e-8, what="gradient")
    active = build_spark(name, decoder_width=64, input_size=128).mask(8, "cuda")
    for f in encoder(x, active):
        assert torch.count_nonzero(f * ~pixel_mask(active, f.shape[-1])) == 0


@pytest.mark.parametrize("name", ["resnet50", "convnext_small"])
def test_cuda_bf16_channels_last_matches_fp32_loss_and_gradients(name: str) -> None:
    model = noised_spark(name, size=224).cuda()
    images = torch.randn(16, 3, 224, 224, device="cuda")
    active = model.mask(16, "cuda", generator=torch.Generator("cuda").manual_seed(0))
    check_bf16_matches_fp32(model, images, active)


@pytest.mark.parametrize(("name", "dtype", "channels_last"), [
    *[(name, torch.float64, False) for name in ("resnet50", "convnext_small", "efficientnet_b0")],
    ("resnet18", torch.float32, True), ("convnext_atto", torch.float32, True),
])
def test_cuda_gather_backend_matches_masked(name: str, dtype: torch.dtype, channels_last: bool) -> None:
    check_backends_agree(name, dtype, channels_last, size=128, batch=8, keep=6, device="cuda")


def test_cuda_sparse_batch_norm_gradients_equal_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    mask = (torch.rand(4, 1, 6, 6) > 0.5).float()
    probe = torch.randn(4, 8, 6, 6)
    grads = []
    for device in ("cpu", "cuda"):
        bn = add_branch_noise(torch.nn.BatchNorm2d(8), seed=0).to(device)
        inputs = (x * mask).to(device).requires_grad_(True)
        out = masked_batch_norm(bn, inputs, mask.to(device))
        wanted = [inputs, bn.weight, bn.bias]
        grads.append([t.cpu() for t in torch.autograd.grad((out * probe.to(device)).sum(), wanted)])
    for on_cuda, on_cpu in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-5, atol=1e-5)


def test_cuda_encoder_matches_cpu_in_float64() -> None:
    """The same noised ResNet-18, sparse, on the GPU and on the CPU: maps and every gradient within 1e-8."""
    _, encoder = make_pair("resnet18", dtype=torch.float64, perturb=BRANCH_NOISE)
    x = torch.randn(4, 3, 128, 128, dtype=torch.float64)
    active = build_spark("resnet18", decoder_width=64, input_size=128).mask(4, "cpu")
    results = []
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(encoder).to(device).train()
        feats, grads = _maps_and_gradients(model, x.to(device), active.to(device))
        results.append(({i: f.cpu() for i, f in enumerate(feats)}, {k: g.cpu() for k, g in grads.items()}))
    assert_per_tensor_close(results[1][0], results[0][0], 1e-8, what="feature map")
    assert_per_tensor_close(results[1][1], results[0][1], 1e-8, what="gradient")
