"""The SparK model: random patch masking, sparse encoding, densifying, light decoding, masked loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from .decoder import LightDecoder
from .encoder import SparseEncoder
from .sparse import masked_batch_norm, upsample_mask

__all__ = ["SPARK_CONFIG_KEYS", "SparK", "Densify", "Reconstruction", "patchify", "unpatchify", "build_spark",
           "build_spark_from_config"]

MASKINGS = ("sparse", "zero")
LOSS_ON = ("masked", "all")
DENSIFY_NORMS = ("auto", "bn", "ln", "none")
# Where densifying projects: "width" only where encoder and decoder widths differ (section 3.2: "in case encoder
# and decoder have different network widths"); "published" at every scale but the coarsest when widths match, as
# the published code does (its ConvNeXt-S decoder has 3x3 projections between equal widths).
DENSIFY_PROJS = ("width", "published")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, L, patch*patch*C)`` with patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for images of ``height x width``."""
    b, _, d = patches.shape
    c = d // (patch * patch)
    x = patches.reshape(b, height // patch, width // patch, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


class Densify(nn.Module):
    """Turns one sparse encoder map into a dense decoder input (S_i -> phi_i(S'_i)).

    Normalises visible sites (BatchNorm over visible sites, or per-site LayerNorm), fills masked
    sites with a learnable mask token, optionally adds a learnable absolute positional embedding,
    and projects to the decoder width (``kernel_size`` conv; identity when widths match, unless ``project``).
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, kernel_size: int, pos_embed_size: tuple[int, int] | None,
        project: bool = False,
    ) -> None:
        super().__init__()
        self.norm_kind = norm
        self.norm = {"bn": nn.BatchNorm2d, "ln": LayerNorm2d}.get(norm, lambda c: nn.Identity())(in_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        trunc_normal_(self.mask_token, std=0.02)
        self.pos_embed = None
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, in_channels, *pos_embed_size))
            trunc_normal_(self.pos_embed, std=0.02)
        self.proj: nn.Module = nn.Identity()
        if in_channels != out_channels or project:
            self.proj = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)

    def forward(self, feat: torch.Tensor, visible: torch.Tensor | None, sync_bn: bool = True) -> torch.Tensor:
        """``feat`` (B, C, h, w) zero at masked sites; ``visible`` float (B, 1, h, w) or None if dense."""
        feat = masked_batch_norm(self.norm, feat, visible, sync_bn) if self.norm_kind == "bn" else self.norm(feat)
        if visible is not None:
            feat = torch.lerp(self.mask_token.to(feat.dtype).expand_as(feat), feat, visible)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != feat.shape[-2:]:
                pos = F.interpolate(pos, size=feat.shape[-2:], mode="bicubic", align_corners=False)
            feat = feat + pos
        return self.proj(feat)


class Reconstruction(NamedTuple):
    """Figure-4 panels in the input's pixel space, each ``(B, 3, H, W)``."""

    masked: torch.Tensor
    pasted: torch.Tensor
    prediction: torch.Tensor


class SparK(nn.Module):
    """Sparse masked modeling with hierarchy (sections 3.1 to 3.3 of the paper).

    ``loss = model(images, active=None)`` masks ``mask_ratio`` of the ``p x p`` patches
    (``p = encoder.downsample_ratio``) at random unless ``active`` (bool ``(B, 1, H/p, W/p)``,
    True = visible) is given, and returns the per-patch-normalised pixel MSE.

    Ablations of table 5: ``masking='zero'`` feeds the zeroed image to the dense encoder;
    ``hierarchy=False`` decodes from the coarsest map only; ``ape=True`` adds learnable absolute
    positional embeddings to the densified maps; ``loss_on='all'`` also counts visible patches.
    ``densify_proj='published'`` keeps a projection between equal widths below the coarsest scale, as the
    published code does (to load its released decoders).
    """

    def __init__(
        self,
        encoder: SparseEncoder,
        decoder: LightDecoder,
        mask_ratio: float = 0.6,
        densify_norm: str = "auto",
        masking: str = "sparse",
        hierarchy: bool = True,
        ape: bool = False,
        loss_on: str = "masked",
        input_size: int = 224,
        pix_norm_eps: float = 1e-6,
        densify_proj: str = "width",
    ) -> None:
        super().__init__()
        _check_choice("masking", masking, MASKINGS)
        _check_choice("densify_proj", densify_proj, DENSIFY_PROJS)
        _check_choice("loss_on", loss_on, LOSS_ON)
        _check_choice("densify_norm", densify_norm, DENSIFY_NORMS)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if input_size % encoder.downsample_ratio:
            raise ValueError(f"input_size {input_size} is not divisible by {encoder.downsample_ratio}")
        if decoder.upsample_ratio != encoder.downsample_ratio:
            raise ValueError(
                f"decoder upsample ratio {decoder.upsample_ratio} != encoder downsample {encoder.downsample_ratio}"
            )
        self.encoder, self.decoder = encoder, decoder
        self.mask_ratio, self.masking, self.hierarchy, self.loss_on = mask_ratio, masking, hierarchy, loss_on
        self.input_size, self.pix_norm_eps = input_size, pix_norm_eps
        self.patch_size = encoder.downsample_ratio
        self.densify_norm = _auto_norm(encoder) if densify_norm == "auto" else densify_norm

        scales = len(encoder.channels) if hierarchy else 1
        enc_widths = encoder.channels[::-1][:scales]  # coarsest first
        self.densify = nn.ModuleList(
            Densify(
                enc_widths[i],
                decoder.widths[i],
                self.densify_norm,
                kernel_size=1 if i == 0 else 3,
                pos_embed_size=(input_size // self.patch_size * 2**i,) * 2 if ape else None,
                project=densify_proj == "published" and i > 0,
            )
            for i in range(scales)
        )

    @property
    def grid_size(self) -> int:
        """Patches per side at ``input_size``."""
        return self.input_size // self.patch_size

    def mask(
        self,
        batch: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Random mask ``(batch, 1, h, w)`` with exactly ``round(L * (1 - mask_ratio))`` visible patches each."""
        h, w = grid or (self.grid_size, self.grid_size)
        num_patches = h * w
        keep = round(num_patches * (1 - self.mask_ratio))
        noise_device = generator.device if generator is not None else device
        noise = torch.rand(batch, num_patches, generator=generator, device=noise_device)
        keep_idx = noise.argsort(dim=1)[:, :keep]
        active = torch.zeros(batch, num_patches, dtype=torch.bool, device=noise_device)
        active.scatter_(1, keep_idx, True)
        return active.view(batch, 1, h, w).to(device)

    def _grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def predict(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, 3, H, W)`` (normalised-patch space) for ``images`` under ``active``."""
        self.encoder.check_inputs(images, active)
        if self.masking == "sparse":
            feats = self.encoder(images, active)
        else:  # zero-outing: the dense encoder sees the image with masked patches set to zero
            pixel_mask = upsample_mask(active, images.shape[-2:]).to(images.dtype)
            feats = self.encoder(images * pixel_mask, None)
        feats = feats[::-1][: len(self.densify)]  # coarsest first
        sync = self.encoder.sparsity.sync_batchnorm
        to_dec = []
        for densify, feat in zip(self.densify, feats):
            visible = None
            if self.masking == "sparse":
                visible = upsample_mask(active, feat.shape[-2:]).to(feat.dtype)
            to_dec.append(densify(feat, visible, sync))
        return self.decoder(to_dec)

    def normalised_target(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch normalised pixels ``(B, L, p*p*3)`` with each patch's mean and std."""
        patches = patchify(images, self.patch_size).float()
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + self.pix_norm_eps).sqrt()
        return (patches - mean) / std, mean, std

    def forward(self, images: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        if active is None:
            active = self.mask(images.shape[0], images.device, grid=self._grid_of(images))
        pred = patchify(self.predict(images, active), self.patch_size).float()
        target, _, _ = self.normalised_target(images)
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, L)
        if self.loss_on == "all":
            return per_patch.mean()
        masked = (~active).flatten(1).to(per_patch.dtype)
        return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, active: torch.Tensor) -> Reconstruction:
        """Masked input, prediction with visible patches pasted from the input, pure prediction."""
        h, w = images.shape[-2:]
        _, mean, std = self.normalised_target(images)
        pred = patchify(self.predict(images, active), self.patch_size).float()
        prediction = unpatchify(pred * std + mean, self.patch_size, h, w).to(images.dtype)
        pixel_mask = upsample_mask(active, (h, w))
        masked = images * pixel_mask.to(images.dtype)
        pasted = torch.where(pixel_mask, images, prediction)
        return Reconstruction(masked, pasted, prediction)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with timm's keys (load into ``timm.create_model(name, num_classes=0)``)."""
        return self.encoder.model.state_dict()


def _auto_norm(encoder: SparseEncoder) -> str:
    """BN for networks that use BatchNorm, LN otherwise (section 4.1 / published recipe)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.model.modules())
    return "bn" if has_bn else "ln"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def build_spark(
    model_name: str,
    decoder_width: int = 768,
    input_size: int = 224,
    drop_path_rate: float = 0.0,
    sparse_backend: str = "masked",
    **spark_kwargs,
) -> SparK:
    """A SparK model around ``timm.create_model(model_name, num_classes=0)`` with a LightDecoder.

    ``sparse_backend`` is the encoder's ``backend`` (``'masked'`` or ``'gather'``)."""
    encoder = SparseEncoder.from_name(model_name, backend=sparse_backend, drop_path_rate=drop_path_rate)
    decoder = LightDecoder(decoder_width, encoder.downsample_ratio)
    return SparK(encoder, decoder, input_size=input_size, **spark_kwargs)


# Keys of a pretraining config (``config.json``, a checkpoint's ``config``) that shape the SparK model.
SPARK_CONFIG_KEYS = ("decoder_width", "input_size", "mask_ratio", "densify_norm", "masking", "sparse_backend",
                     "hierarchy", "ape", "loss_on", "densify_proj")
# Config key of the encoder's stochastic depth: ``drop_path`` (``drop_path_rate`` in configs written before the
# suite took timm's flag names), passed to timm as ``drop_path_rate``.
DROP_PATH_KEYS = ("drop_path", "drop_path_rate")


def build_spark_from_config(config: Mapping[str, Any], **overrides: Any) -> SparK:
    """The SparK model a pretraining config describes (``config['model']`` plus :data:`SPARK_CONFIG_KEYS`).

    ``overrides`` replace config values (e.g. ``masking='zero'`` for a benchmark, ``mask_ratio`` for figures).
    A ``densify_proj`` of ``auto`` (no start weights settled it) is ``width``.
    """
    kwargs = {key: config[key] for key in SPARK_CONFIG_KEYS if key in config}
    if kwargs.get("densify_proj") == "auto":
        kwargs["densify_proj"] = "width"
    drop_path = next((config[key] for key in DROP_PATH_KEYS if key in config), None)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    kwargs.update(overrides)
    return build_spark(config["model"], **kwargs)
