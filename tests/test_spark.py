"""The SparK objective, masking and the table-5 ablation switches."""

import pytest
import timm
import torch

from pretrain.spark import SparK, build_spark, patchify, unpatchify

SIZE = 64  # 2x2 patch grid


def _model(name: str = "resnet18", **kwargs) -> SparK:
    torch.manual_seed(0)
    return build_spark(name, decoder_width=64, input_size=SIZE, **kwargs)


def _images(batch: int = 4, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_mask_keeps_exactly_the_right_number_of_patches() -> None:
    model = build_spark("resnet18", decoder_width=64, input_size=224)  # 7x7 = 49 patches
    active = model.mask(16, "cpu", generator=torch.Generator().manual_seed(0))
    assert active.shape == (16, 1, 7, 7) and active.dtype == torch.bool
    assert (active.flatten(1).sum(1) == round(49 * 0.4)).all()
    again = model.mask(16, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(active, again)
    assert not torch.equal(active[0], active[1])


def test_patchify_roundtrip() -> None:
    x = _images(2, 96)
    patches = patchify(x, 32)
    assert patches.shape == (2, 9, 32 * 32 * 3)
    assert torch.equal(unpatchify(patches, 32, 96, 96), x)
    assert torch.equal(patches[0, 1].view(32, 32, 3).permute(2, 0, 1), x[0, :, :32, 32:64])


def test_loss_equals_straightforward_formulation() -> None:
    model = _model()
    x = _images()
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(1))
    loss = model(x, active)
    pred = model.predict(x, active)
    # per-patch normalised target, written out longhand
    expected_terms = []
    for b in range(4):
        for i in range(2):
            for j in range(2):
                if active[b, 0, i, j]:
                    continue
                target = x[b, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
                target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                p = pred[b, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
                expected_terms.append((p - target).pow(2).mean())
    torch.testing.assert_close(loss, torch.stack(expected_terms).mean(), rtol=1e-5, atol=1e-6)


def test_loss_on_all_counts_visible_patches_too() -> None:
    masked_only, every = _model(), _model(loss_on="all")
    x = _images()
    active = masked_only.mask(4, "cpu", generator=torch.Generator().manual_seed(1))
    pred = patchify(masked_only.predict(x, active), 32)
    target, _, _ = masked_only.normalised_target(x)
    per_patch = (pred - target).pow(2).mean(-1)
    torch.testing.assert_close(every(x, active), per_patch.mean())
    assert not torch.allclose(masked_only(x, active), every(x, active))


def test_prediction_does_not_see_masked_pixels() -> None:
    model = _model()
    x = _images()
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(2))
    pixels = active.repeat_interleave(32, 2).repeat_interleave(32, 3)
    x2 = torch.where(pixels, x, torch.randn_like(x))
    assert torch.equal(model.predict(x, active), _model().predict(x2, active))


def test_a_few_steps_on_a_fixed_batch_lower_the_loss() -> None:
    model = _model()
    x = _images(8)
    active = model.mask(8, "cpu", generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(x, active)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_densify_fills_masked_sites_with_the_scale_token() -> None:
    model = _model("convnext_atto")
    assert model.densify_norm == "ln" and _model().densify_norm == "bn"
    x = _images()
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(4))
    feat = model.encoder(x, active)[-1]  # coarsest, 2x2
    dens = model.densify[0]
    token_site = (~active).nonzero()[0]
    out = dens.norm(feat) * active.float()
    filled = torch.lerp(dens.mask_token.expand_as(out), out, active.float())
    b, _, i, j = token_site.tolist()
    torch.testing.assert_close(filled[b, :, i, j], dens.mask_token.flatten())
    torch.testing.assert_close(dens(feat, active.float()), dens.proj(filled))


def test_zero_outing_runs_the_dense_encoder_on_the_zeroed_image() -> None:
    model = _model(masking="zero")
    x = _images()
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(5))
    seen = []
    handle = model.encoder.model.conv1.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    model(x, active)
    handle.remove()
    pixels = active.repeat_interleave(32, 2).repeat_interleave(32, 3)
    image_in, conv_out = seen[0]
    assert torch.equal(image_in, x * pixels)
    # dense convolution: masked regions next to visible ones are no longer zero ("mask pattern vanishing")
    outside = ~active.repeat_interleave(16, 2).repeat_interleave(16, 3).expand_as(conv_out)
    assert conv_out[outside].abs().sum() > 0
    model(x, active).backward()  # the dense encoder leaves no hole to fill: the mask tokens get no gradient
    assert all(d.mask_token.grad is None for d in model.densify)
    assert model.decoder.proj.weight.grad is not None and model.encoder.model.conv1.weight.grad.abs().sum() > 0
    sparse = _model()
    sparse(x, active).backward()
    assert all(d.mask_token.grad.abs().sum() > 0 for d in sparse.densify)  # where holes are filled, they learn


def test_without_hierarchy_only_the_coarsest_map_is_decoded() -> None:
    model = _model(hierarchy=False)
    assert len(model.densify) == 1
    x = _images()
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(6))
    inputs = []
    handle = model.decoder.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    model(x, active)
    handle.remove()
    assert len(inputs[0]) == 1 and inputs[0][0].shape[-1] == SIZE // 32


def test_absolute_positional_embedding_is_learned_per_scale() -> None:
    model = _model(ape=True)
    shapes = [tuple(d.pos_embed.shape) for d in model.densify]
    assert shapes == [(1, 512, 2, 2), (1, 256, 4, 4), (1, 128, 8, 8), (1, 64, 16, 16)]
    x = _images()
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(7))
    model(x, active).backward()
    assert all(d.pos_embed.grad.abs().sum() > 0 for d in model.densify)
    assert _model(ape=False).densify[0].pos_embed is None


def test_reconstruct_panels() -> None:
    model = _model().eval()
    x = _images()
    active = model.mask(4, "cpu", generator=torch.Generator().manual_seed(8))
    rec = model.reconstruct(x, active)
    pixels = active.repeat_interleave(32, 2).repeat_interleave(32, 3).expand_as(x)
    assert torch.equal(rec.masked[~pixels], torch.zeros_like(x[~pixels]))
    assert torch.equal(rec.pasted[pixels], x[pixels])
    assert torch.equal(rec.pasted[~pixels], rec.prediction[~pixels])
    # the pure prediction is mapped back to pixels with each input patch's mean and std
    _, mean, std = model.normalised_target(x)
    normalised = patchify(model.predict(x, active), 32)
    torch.testing.assert_close(patchify(rec.prediction, 32), normalised * std + mean)


def test_encoder_weights_load_strictly_into_timm() -> None:
    model = _model("convnext_atto")
    reference = timm.create_model("convnext_atto", num_classes=0)
    reference.load_state_dict(model.encoder_state_dict(), strict=True)


@pytest.mark.parametrize(
    "kwargs", [{"masking": "blank"}, {"loss_on": "visible"}, {"densify_norm": "gn"}, {"mask_ratio": 1.0}]
)
def test_bad_options_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        _model(**kwargs)
