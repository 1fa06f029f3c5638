"""The properties every sparse encoder must have, as reusable checks (used by test_encoder, test_gather and
test_families).

1. dense equivalence: with every patch visible the encoder is the timm model (values, running statistics);
2. exact zeros: every masked site of the four maps is exactly 0;
3. no leakage: masked pixels receive no gradient and changing them changes nothing;
4. visible-only BatchNorm: the statistics (and running statistics) are those of the visible sites;
5. visible-only averaging: with only the central 2x2 patches of a 4x4 grid visible, the encoder computes
   on them exactly what the dense model computes on the central crop alone, so every global pool,
   attention pooling or batch statistic inside the network saw the visible sites and nothing else.
"""

from __future__ import annotations

import copy

import timm
import torch
from torch import nn

from pretrain.encoder import FEATURE_STRIDES, SparseEncoder


def make_pair(
    name: str, dtype: torch.dtype = torch.float32, perturb: float = 0.0, **timm_kwargs
) -> tuple[nn.Module, SparseEncoder]:
    """A seeded timm model (``num_classes=0``) and a sparse encoder wrapping a deep copy of it.

    ``perturb`` adds that much Gaussian noise to every parameter of at most one dimension (biases, norm
    affines, layer scales): timm initialises biases to 0, BatchNorm weights ending a residual branch to 0 and
    layer scales to 1e-6, which would hide a layer that writes its bias to masked sites, or a whole branch.
    """
    torch.manual_seed(0)
    reference = timm.create_model(name, num_classes=0, **timm_kwargs).to(dtype)
    add_branch_noise(reference, perturb)
    return reference, SparseEncoder(copy.deepcopy(reference))


BRANCH_NOISE = 0.2  # what the equivalence tests add with add_branch_noise (fp32 errors stay below 1e-5 with it)


def add_branch_noise(model: nn.Module, scale: float = BRANCH_NOISE, seed: int | None = None) -> nn.Module:
    """``model`` with Gaussian noise of std ``scale`` added in place to every parameter of at most one dimension
    (biases, norm affines, layer scales, see ``make_pair``), drawn from the global RNG or, given ``seed``, from
    its own generator (then the same noise whatever the dtype). Every equivalence test runs on such weights."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() <= 1 and scale:
                noise = (torch.randn_like(parameter) if generator is None
                         else torch.randn(parameter.shape, generator=generator).to(parameter))
                parameter.add_(noise * scale)
    return model


def random_mask(batch: int, grid: int, keep: int, seed: int) -> torch.Tensor:
    """A bool mask ``(batch, 1, grid, grid)`` with ``keep`` random visible patches per sample."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, grid * grid, generator=g).argsort(1)[:, :keep]
    active = torch.zeros(batch, grid * grid, dtype=torch.bool).scatter_(1, idx, True)
    return active.view(batch, 1, grid, grid)


def pixel_mask(active: torch.Tensor, size: int) -> torch.Tensor:
    """``active`` upsampled to a square map of side ``size``."""
    scale = size // active.shape[-1]
    return active.repeat_interleave(scale, 2).repeat_interleave(scale, 3)


def assert_close_relative(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, scale: torch.Tensor | None = None
) -> None:
    """``actual`` equals ``expected`` within ``rtol`` of the largest expected magnitude (or of ``scale``'s, for
    quantities that vanish analytically, such as the mean of a map right after a BatchNorm)."""
    reference = expected if scale is None else scale
    err = float((actual.detach() - expected.detach()).abs().max() / reference.detach().abs().max().clamp_min(1e-12))
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def _inputs(batch: int, size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def check_full_mask_equals_dense(
    reference: nn.Module, encoder: SparseEncoder, train: bool, size: int = 128, batch: int = 4, rtol: float = 1e-5
) -> None:
    """Property 1: with every patch visible, the maps (and in training the running statistics) are timm's."""
    reference.train(train)
    encoder.train(train)
    x = _inputs(batch, size, _dtype(reference))
    grid = size // encoder.downsample_ratio
    expected = reference.forward_intermediates(x, indices=len(FEATURE_STRIDES), intermediates_only=True)
    actual = encoder(x, torch.ones(batch, 1, grid, grid, dtype=torch.bool))
    assert [f.shape[1] for f in actual] == encoder.channels
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        assert_close_relative(a, e, rtol)
    if train:  # running statistics updated alike; a running mean is compared on the scale of its spread
        actual_state, expected_state = encoder.model.state_dict(), reference.state_dict()
        assert list(actual_state) == list(expected_state)
        for key, value in actual_state.items():
            if key.endswith("running_var"):
                assert_close_relative(value, expected_state[key], rtol)
            elif key.endswith("running_mean"):
                spread = expected_state[key.replace("running_mean", "running_var")].sqrt()
                assert_close_relative(value, expected_state[key], rtol, scale=spread)


def check_zeros_and_no_leakage(encoder: SparseEncoder, size: int = 96, batch: int = 2, keep: int = 4) -> None:
    """Properties 2 and 3: masked sites are exactly zero, masked pixels get no gradient and change nothing
    (checked against a deep copy taken before the first pass, so running statistics start equal)."""
    encoder.train()
    twin = copy.deepcopy(encoder)
    active = random_mask(batch, size // encoder.downsample_ratio, keep=keep, seed=1)
    pixels = pixel_mask(active, size)
    x = _inputs(batch, size, _dtype(encoder)).requires_grad_(True)
    feats = encoder(x, active)
    for f in feats:
        site_mask = pixel_mask(active, f.shape[-1]).expand_as(f)
        assert torch.all(f.masked_select(~site_mask) == 0), f"non-zero masked site in a {tuple(f.shape)} map"
        assert f.masked_select(site_mask).abs().sum() > 0
    sum(f.square().sum() for f in feats).backward()
    assert torch.all(x.grad.masked_select(~pixels.expand_as(x)) == 0), "gradient reached a masked pixel"
    assert x.grad.masked_select(pixels.expand_as(x)).abs().sum() > 0
    scrambled = torch.where(pixels, x.detach(), torch.randn_like(x) * 10)
    for a, b in zip(feats, twin(scrambled, active), strict=True):
        assert torch.equal(a.detach(), b.detach()), "a masked pixel changed a visible output"


def check_visible_batchnorm_statistics(
    encoder: SparseEncoder, size: int = 96, batch: int = 2, keep: int = 4, rtol: float = 1e-5
) -> None:
    """Property 4: every BatchNorm on a feature map updates its running statistics from visible sites only."""
    encoder.train()
    active = random_mask(batch, size // encoder.downsample_ratio, keep=keep, seed=2)
    inputs: dict[str, torch.Tensor] = {}
    norms = {n: m for n, m in encoder.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms, "no BatchNorm2d layers"
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach()))
               for n, m in norms.items()]
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    try:
        encoder(_inputs(batch, size, _dtype(encoder)), active)
    finally:
        for h in handles:
            h.remove()
    checked = 0
    for n, bn in norms.items():
        x = inputs.get(n)
        if x is None or x.shape[-1] == 1 or bn.momentum is None:
            continue  # not on the path to the four maps, or a norm of pooled (global) vectors
        visible = pixel_mask(active, x.shape[-1]).expand(-1, x.shape[1], -1, -1)
        sites = x.permute(1, 0, 2, 3)[visible.permute(1, 0, 2, 3)].view(x.shape[1], -1)
        mean, var = sites.mean(1), sites.var(1, unbiased=True)
        old_mean, old_var = before[n]
        m = bn.momentum
        assert_close_relative(bn.running_mean, (1 - m) * old_mean + m * mean, rtol, scale=var.sqrt())
        assert_close_relative(bn.running_var, (1 - m) * old_var + m * var, rtol)
        checked += 1
    assert checked, "no BatchNorm on a feature map was checked"


def _padding_as_absent(model: nn.Module) -> nn.Module:
    """``model`` with padding that reads zeros and is not counted in averages, which is how sparse semantics
    treats masked neighbours: average pools stop counting padding, reflecting or replicating pads read zeros."""
    for module in model.modules():
        if isinstance(module, nn.AvgPool2d):
            module.count_include_pad = False
        if getattr(module, "pad_mode", "constant") != "constant":  # e.g. timm's BlurPool2d
            module.pad_mode = "constant"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            module.padding_mode = "zeros"
    return model


def check_visible_averaging(
    reference: nn.Module, encoder: SparseEncoder, train: bool = True, batch: int = 2, rtol: float = 1e-5
) -> None:
    """Property 5: on a 128 px image whose only visible patches are the central 2x2 of the 4x4 grid, the
    maps over those patches equal the dense model's maps of the 64 px central crop.

    The crop's borders are all masked neighbours, which sparse semantics treats as absent, exactly as the
    dense model treats zero padding; average pools that count padding (``count_include_pad``) are switched
    to the same convention in the reference. Any layer that mixed in masked sites (a global mean over all
    sites, attention weights on masked tokens, BatchNorm statistics of masked sites) would differ.
    """
    ratio = encoder.downsample_ratio
    crop = _padding_as_absent(copy.deepcopy(reference))
    crop.train(train)
    encoder.train(train)
    size = 4 * ratio
    x = _inputs(batch, size, _dtype(reference))
    active = torch.zeros(batch, 1, 4, 4, dtype=torch.bool)
    active[:, :, 1:3, 1:3] = True
    centre = slice(ratio, 3 * ratio)
    expected = crop.forward_intermediates(x[:, :, centre, centre], indices=len(FEATURE_STRIDES),
                                          intermediates_only=True)
    for a, e, stride in zip(encoder(x, active), expected, FEATURE_STRIDES, strict=True):
        inner = slice(ratio // stride, 3 * ratio // stride)
        assert_close_relative(a[:, :, inner, inner], e, rtol)


# --- hybrids: a central crop of any grid, and attention that must not look at masked keys ---------------------


def check_central_crop(
    encoder: SparseEncoder, crop_model: nn.Module, grid: int = 4, train: bool = True, batch: int = 2,
    rtol: float = 1e-5,
) -> None:
    """Property 5 for any even ``grid``: with only the central ``grid/2 x grid/2`` patches visible, the maps over
    them equal ``crop_model``'s maps of the central crop.

    ``crop_model`` is prepared by the caller: padding treated as absent (``_padding_as_absent``) and, for layers
    that depend on where a site is or on the input size, the full image's absolute positions or relative tables
    cut to the crop, so that the crop computes what a sparse model that left the masked sites out must compute.
    """
    ratio, quarter = encoder.downsample_ratio, grid // 4
    crop_model.train(train)
    encoder.train(train)
    x = _inputs(batch, grid * ratio, _dtype(encoder))
    active = torch.zeros(batch, 1, grid, grid, dtype=torch.bool)
    active[:, :, quarter:grid - quarter, quarter:grid - quarter] = True
    pixels = slice(quarter * ratio, (grid - quarter) * ratio)
    cropped = crop_model.forward_intermediates(x[:, :, pixels, pixels], indices=len(FEATURE_STRIDES),
                                               intermediates_only=True)
    for sparse, dense in zip(encoder(x, active), cropped, strict=True):
        start = (sparse.shape[-1] - dense.shape[-1]) // 2
        centre = slice(start, start + dense.shape[-1])
        assert_close_relative(sparse[:, :, centre, centre], dense, rtol)


def map_sites(out: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Visible sites ``(B, 1, h, w)`` of a square map ``out`` at any resolution: a coarse site is visible when any
    patch it covers is."""
    side, grid = out.shape[-1], active.shape[-1]
    if side >= grid:
        return pixel_mask(active, side)
    return torch.nn.functional.max_pool2d(active.double(), grid // side) > 0


def token_sites(out: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Visible rows ``(B, N, 1)`` of the row-major tokens ``(B, N, C)`` of a square map."""
    side = round(out.shape[1] ** 0.5)
    return map_sites(out.new_empty(1, 1, side, side), active).flatten(1).unsqueeze(-1)


def check_masked_keys_ignored(
    encoder: SparseEncoder, projections: list[tuple[nn.Module, object]], size: int = 64, batch: int = 2,
    keep: int = 2, rtol: float = 1e-9,
) -> None:
    """Property 6, attention over visible tokens: each ``(module, sites)`` pair names a projection whose output
    only feeds attention as queries, keys or values, and ``sites(output, active)`` its visible positions.
    Writing large noise into every masked position of those outputs changes no map: masked keys get no weight,
    masked queries output zeros."""
    assert projections, "no attention projection to poison"
    encoder.train()
    active = random_mask(batch, size // encoder.downsample_ratio, keep=keep, seed=3)
    x = _inputs(batch, size, _dtype(encoder))
    clean = encoder(x, active)

    def poison(sites):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return torch.where(sites(out, active), out, torch.randn_like(out) * 100)

        return hook

    handles = [module.register_forward_hook(poison(sites)) for module, sites in projections]
    try:
        poisoned = encoder(x, active)
    finally:
        for handle in handles:
            handle.remove()
    for a, b in zip(clean, poisoned, strict=True):
        assert_close_relative(b, a, rtol)
