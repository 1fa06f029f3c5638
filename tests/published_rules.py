"""Reference computations of the published fine-tuning code, written from its rules (not its code) for parity tests.

Each function states one rule and the file of the public SparK repository (github.com/keyu-tian/SparK) or of the
ConvNeXt repository (github.com/facebookresearch/ConvNeXt) it comes from. They work on plain names, numbers and
tensors, independent of the suite, so a test can compare the suite's optimiser groups, schedule and loss with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- ImageNet fine-tuning: downstream_imagenet/ -------------------------------------------------------------------

# downstream_imagenet/arg.py (HP_DEFAULT_VALUES, commit a63e386): what a published fine-tuning run of each model
# takes when its command line sets nothing: global batch, epochs, warm-up epochs, optimiser, base lr (peak lr =
# base lr x batch / 256), layer-wise lr scale, weight decay, mixup alpha, repeated augmentation, drop path, EMA.
SPARK_FT_NAMES = ("bs", "ep", "wp_ep", "opt", "base_lr", "lr_scale", "wd", "mixup", "rep_aug", "drop_path", "ema")
SPARK_FT_DEFAULTS = {name: dict(zip(SPARK_FT_NAMES, values)) for name, values in {
    "convnext_small": (4096, 400, 20, "adam", 2e-4, 0.7, 0.01, 0.8, 3, 0.3, 0.9999),
    "convnext_base": (4096, 400, 20, "adam", 1e-4, 0.7, 0.01, 0.8, 3, 0.4, 0.9999),
    "convnext_large": (4096, 200, 10, "adam", 1e-4, 0.7, 0.02, 0.8, 3, 0.5, 0.9999),
    "convnext_large_384": (1024, 200, 20, "adam", 6e-5, 0.7, 0.01, 0.8, 3, 0.5, 0.99995),
    "resnet50": (2048, 300, 5, "lamb", 2e-3, 0.7, 0.02, 0.1, 0, 0.05, 0.9999),
    "resnet101": (2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet152": (2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet200": (2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
}.items()}
# downstream_imagenet/util.py: the mixing of every run (BatchMixup: cutmix alpha 1.0, every batch, cutmix or mixup
# with equal probability, label smoothing 0.1 inside the targets); the loss is BCE with LAMB, soft-target
# cross-entropy with AdamW.
SPARK_MIX = {"cutmix": 1.0, "prob": 1.0, "switch_prob": 0.5, "smoothing": 0.1}

# downstream_imagenet/util.py: the names whose parameters never decay, matched as substrings.
SPARK_NO_WD_KEYS = ("cls_token", "pos_embed", "mask_token", "gamma")
# downstream_imagenet/models/__init__.py: blocks per layer group in (layer2, layer3), by their block counts.
SPARK_RESNET_CHUNKS = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4), (30, 48): (5, 6)}


def spark_resnet_layer(name: str, blocks2: int, blocks3: int) -> tuple[int, int]:
    """``(layer id, scale exponent)`` of a timm ResNet parameter (downstream_imagenet/models/__init__.py).

    The stem is layer 0 and ``layer1`` layer 1; ``layer2`` and ``layer3`` are cut into groups of consecutive blocks
    (sizes per depth in :data:`SPARK_RESNET_CHUNKS`; other depths are an error there), ``layer4`` is layer
    ``N = 2 + groups2 + groups3``, ``fc`` layer ``N + 1``. The lr scale is ``decay ** (N + 1 - layer)``.
    """
    chunk2, chunk3 = SPARK_RESNET_CHUNKS[(blocks2, blocks3)]
    groups2, groups3 = math.ceil(blocks2 / chunk2), math.ceil(blocks3 / chunk3)
    top = 2 + groups2 + groups3
    match = re.match(r"layer(\d)\.(\d+)\.", name)
    if match:
        stage, block = int(match[1]), int(match[2])
        layer = {1: 1, 2: 2 + block // chunk2, 3: 2 + groups2 + block // chunk3, 4: top}[stage]
    elif name.startswith("fc."):
        layer = top + 1
    else:
        layer = 0
    return layer, top + 1 - layer


def _rename(name: str, rules: tuple[tuple[str, str], ...], what: str) -> str:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no {what} name for {name}")


# timm ConvNeXt names -> the official ConvNeXt's (downstream_imagenet/models/convnext_official.py and the ConvNeXt
# repository's mmdet backbone): ``downsample_layers.0`` is the stem, ``downsample_layers.i`` the i-th downsampling,
# ``stages.i.j`` block j of stage i; the classifier's ``norm`` and ``head`` last.
OFFICIAL_CONVNEXT_NAMES = ((r"stem\.(.*)", r"downsample_layers.0.\1"),
                           (r"stages\.(\d)\.downsample\.(.*)", r"downsample_layers.\1.\2"),
                           (r"stages\.(\d)\.blocks\.(\d+)\.(.*)", r"stages.\1.\2.\3"),
                           (r"head\.norm\.(.*)", r"norm.\1"), (r"head\.fc\.(.*)", r"head.\1"))


def official_convnext_name(timm_name: str) -> str:
    """The name a timm ConvNeXt parameter has in the official ConvNeXt the published code fine-tunes."""
    return _rename(timm_name, OFFICIAL_CONVNEXT_NAMES, "official ConvNeXt")


def spark_convnext_layer(official: str, stage3_blocks: int) -> tuple[int, int]:
    """``(layer id, scale exponent)`` of an official ConvNeXt parameter (downstream_imagenet/models/__init__.py).

    ``N`` is 12 when stage 3 (index 2) has more than 9 blocks, else 6. The stem is layer 0, downsampling 1 and 2
    layers 2 and 3, downsampling 3 layer N; stage 0 is layer 1, stage 1 layer 2, block b of stage 2 layer
    ``3 + b // 3``, stage 3 layer N; everything else (norm, head) ``N + 1``. Exponent ``N + 1 - layer``.
    """
    top = 12 if stage3_blocks > 9 else 6
    parts = official.split(".")
    if parts[0] == "downsample_layers":
        layer = {0: 0, 1: 2, 2: 3, 3: top}[int(parts[1])]
    elif parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        layer = {0: 1, 1: 2, 2: 3 + block // 3, 3: top}[stage]
    else:
        layer = top + 1
    return layer, top + 1 - layer


def spark_cls_groups(params: Iterable[tuple[str, nn.Parameter]], layer_of, weight_decay: float,
                     decay: float) -> dict[str, tuple[float, float]]:
    """``name -> (lr scale, weight decay)`` by downstream_imagenet/lr_decay.py ``get_param_groups`` and
    ``lr_wd_annealing``: no decay for 1-D parameters, names ending in ``.bias`` and names containing
    :data:`SPARK_NO_WD_KEYS`; lr scale ``decay ** exponent`` only when ``0 < decay < 1`` (else 1). ``layer_of(name)``
    gives ``(layer, exponent)``."""
    groups = {}
    for name, param in params:
        if not param.requires_grad:
            continue
        no_wd = param.ndim == 1 or name.endswith(".bias") or any(k in name for k in SPARK_NO_WD_KEYS)
        scale = decay ** layer_of(name)[1] if 0.0 < decay < 1.0 else 1.0
        groups[name] = (scale, 0.0 if no_wd else weight_decay)
    return groups


def spark_lr(peak: float, step: int, warmup_steps: float, total_steps: int) -> float:
    """The lr of optimiser step ``step`` (0-based) before the group's scale (downstream_imagenet/lr_decay.py
    ``lr_wd_annealing``): linear from 0.5% of the peak over ``round(warmup_steps)`` steps, then a half cosine from
    the peak that reaches 0.1% of it at the last step ``total_steps - 1``."""
    warmup = round(warmup_steps)
    if step < warmup:
        return 0.005 * peak + 0.995 * peak * step / warmup
    ratio = (step - warmup) / (total_steps - 1 - warmup)
    return 0.001 * peak + 0.999 * peak * (0.5 + 0.5 * math.cos(math.pi * ratio))


def spark_mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              smoothing: float, prob: float = 1.0, switch_prob: float = 0.5, upper_half=lambda cut: cut // 2
              ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Mixed images, mixed soft targets and the branch taken (``mixup``, ``cutmix`` or ``none``) by
    downstream_imagenet/mixup.py ``BatchMixup`` in batch mode, drawing from NumPy's global generator in its order:
    ``rand() < prob``, then with both alphas ``rand() < switch_prob`` (cutmix) and a Beta(alpha, alpha) draw. Mixup
    blends each image with the batch reversed; cutmix pastes a box of the reversed batch: side ``int(size *
    sqrt(1 - lam))``, centre drawn uniformly (``randint`` rows, then columns), edges ``centre - cut // 2`` and
    ``centre + upper_half(cut)`` clipped to the image, ``lam`` corrected to the box's area. Targets: one-hot with
    ``smoothing / K`` off and ``1 - smoothing + smoothing / K`` on, blended with the reversed batch's by ``lam``.
    ``upper_half`` is the published code's ``cut // 2`` unless a test names another rounding.
    """
    images = images.clone()
    lam, branch = 1.0, "none"
    if np.random.rand() < prob:
        use_cutmix = np.random.rand() < switch_prob if mixup > 0 and cutmix > 0 else cutmix > 0
        lam = float(np.random.beta(cutmix, cutmix) if use_cutmix else np.random.beta(mixup, mixup))
        branch = "cutmix" if use_cutmix else "mixup"
    if branch == "cutmix":
        height, width = images.shape[-2:]
        ratio = math.sqrt(1 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = np.random.randint(0, height), np.random.randint(0, width)
        top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + upper_half(cut_h), 0, height)
        left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + upper_half(cut_w), 0, width)
        images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    elif branch == "mixup":
        images = images * lam + images.flip(0) * (1.0 - lam)
    off = smoothing / num_classes
    one_hot = torch.full((len(labels), num_classes), off, dtype=images.dtype)
    one_hot[torch.arange(len(labels)), labels] = 1.0 - smoothing + off
    return images, one_hot * lam + one_hot.flip(0) * (1.0 - lam), branch


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over every element (timm ``BinaryCrossEntropy(smoothing=0,
    target_threshold=None)`` as downstream_imagenet/util.py uses it with LAMB): ``mean(softplus(z) - t z)``."""
    return (F.softplus(logits) - targets * logits).mean()


def soft_target_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over the batch (timm ``SoftTargetCrossEntropy``, used with
    AdamW in downstream_imagenet/util.py): ``mean_i sum_k -t_ik log softmax(z_i)_k``."""
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


# --- COCO, ResNet-50 in Detectron2: downstream_d2/ ----------------------------------------------------------------

# Detectron2 0.6 solver/build.py get_default_optimizer_params: the module classes whose parameters take
# SOLVER.WEIGHT_DECAY_NORM.
D2_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
                 nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)


def d2_lr_factor(name: str, decay: float, resnet50: bool = True) -> float:
    """The lr factor of a Detectron2 parameter by downstream_d2/lr_decay.py ``lr_factor_func``: ``N`` is 5 for
    ResNet-50 (else 11); names containing ``.stem.`` are layer 0; ``.resS.B.`` gives res2 1, res3 2, res4
    ``3 + B // 3``, res5 N; everything else ``N + 1``. Factor ``decay ** (N + 1 - layer)`` (decay 0 means 1)."""
    decay = decay or 1.0
    top = 5 if resnet50 else 11
    match = re.search(r"\.res(\d)\.(\d+)\.", name)
    if ".stem." in name:
        layer = 0
    elif match:
        stage, block = int(match[1]), int(match[2])
        layer = {2: 1, 3: 2, 4: 3 + block // 3}.get(stage, top)
    else:
        layer = top + 1
    return decay ** (top + 1 - layer)


def d2_groups(model: nn.Module, base_lr: float, weight_decay: float, decay: float, weight_decay_norm: float = 0.0,
              weight_decay_bias: float | None = None) -> dict[str, tuple[float, float]]:
    """``name -> (lr, weight decay)`` as downstream_d2/train_net.py builds its optimiser: Detectron2's
    ``get_default_optimizer_params`` with ``lr_factor_func``: lr ``base_lr x factor``; weight decay
    ``weight_decay_norm`` for parameters of :data:`D2_NORM_TYPES` modules, then ``weight_decay_bias`` for any
    parameter named ``bias`` when that is set, else the optimiser's ``weight_decay``."""
    groups = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            wd = weight_decay_norm if isinstance(module, D2_NORM_TYPES) else weight_decay
            if param_name == "bias" and weight_decay_bias is not None:
                wd = weight_decay_bias
            groups[name] = (base_lr * d2_lr_factor(name, decay), wd)
    return groups


# --- COCO, ConvNeXt in MMDetection: ConvNeXt repository object_detection/mmcv_custom/ -----------------------------


def mmdet_layer(name: str, num_max_layer: int = 12) -> int:
    """Layer id by ``get_num_layer_layer_wise`` (layer_decay_optimizer_constructor.py) for mmdet names:
    ``backbone.downsample_layers.i``: 0, 2, 3, num_max_layer for i = 0..3; ``backbone.stages.i.j``: 1, 2,
    ``3 + j // 3``, num_max_layer; anything else (``backbone.norm0..3``, neck, heads) ``num_max_layer + 1``."""
    parts = name.split(".")
    if name.startswith("backbone.downsample_layers"):
        return {0: 0, 1: 2, 2: 3, 3: num_max_layer}[int(parts[2])]
    if name.startswith("backbone.stages"):
        stage, block = int(parts[2]), int(parts[3])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: num_max_layer}[stage]
    return num_max_layer + 1


def mmdet_groups(params: Iterable[tuple[str, nn.Parameter]], base_lr: float, weight_decay: float, decay: float,
                 num_layers: int = 12) -> dict[str, tuple[float, float]]:
    """``mmdet name -> (lr, weight decay)`` by ``LearningRateDecayOptimizerConstructor`` (layer_wise): no weight
    decay for 1-D parameters and names ending in ``.bias``; lr ``base_lr x decay ** (num_layers + 2 - id - 1)``."""
    groups = {}
    for name, param in params:
        no_wd = param.ndim == 1 or name.endswith(".bias")
        scale = decay ** (num_layers + 2 - mmdet_layer(name, num_layers) - 1)
        groups[name] = (base_lr * scale, 0.0 if no_wd else weight_decay)
    return groups


def mmdet_name(suite_name: str) -> str:
    """The mmdet name of a parameter of the suite's Detectron2 ConvNeXt Mask R-CNN (timm backbone): the ConvNeXt
    backbone of object_detection/mmdet/models/backbones/convnext.py for the bottom-up part (official names under
    ``backbone.``, stage-output norms ``backbone.norm0..3``), ``neck``/``rpn_head``/``roi_head`` for the rest (their
    inner names do not matter to the rule)."""
    body = "backbone.bottom_up.model."
    if suite_name.startswith(body):
        return "backbone." + official_convnext_name(suite_name[len(body):])
    rules = ((r"backbone\.bottom_up\.(norm\d\..*)", r"backbone.\1"), (r"backbone\.(fpn_.*)", r"neck.\1"),
             (r"proposal_generator\.(.*)", r"rpn_head.\1"), (r"roi_heads\.(.*)", r"roi_head.\1"))
    return _rename(suite_name, rules, "mmdet")
