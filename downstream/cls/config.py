"""The fine-tuning configuration: :class:`ClsConfig`, filled from a recipe (YAML data) and overrides.

Recipes live in ``downstream/cls/recipes/<name>.yaml`` (see their comments for every value's source):
``table7`` / ``table8`` (the paper's appendix C), ``table7-code`` / ``table8-code`` / ``table8-code-384`` (what the
published SparK code ran), ``rsb-a2`` / ``convnext-in1k`` (the supervised baselines the paper quotes: Wightman et al.
2021 procedure A2, Liu et al. 2022 ImageNet-1K training), ``linear`` (linear probing, table 6) and ``tiny`` (the
embedded demo). Resolution goes
through :class:`pretrain.runtime.config.ConfigSchema` (recipe, its ``base`` chain, matching ``per_model`` entries,
overrides), then the derived values: the peak learning rate (linear in the global batch, relative to
``lr_base_size``) and the gradient-accumulation steps. Imports neither torch nor timm.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pretrain.runtime.config import (
    DEMO_DATA,
    ConfigError,
    ConfigSchema,
    PresetStore,
    TrainingRunConfig,
    require_all,
    setting,
)

__all__ = [
    "BUNDLED_RECIPES",
    "SCHEMA",
    "ClsConfig",
    "ConfigError",
    "default_recipe",
    "require_data",
    "resolve_config",
]

PROTOCOLS = ("finetune", "linear")
OPTIMIZERS = ("lamb", "adamw", "sgd", "momentum")  # timm names: sgd is Nesterov, momentum plain
LAYER_DECAY_GROUPS = ("timm", "published")
INTERPOLATIONS = ("bicubic", "bilinear")
CROP_MODES = ("center", "squash", "border")
# Recipes whose values the --help of every flag shows (launchers build argv with ``SCHEMA.to_argv(overrides)``).
BUNDLED_RECIPES = ("table7", "table7-code", "table8", "table8-code", "table8-code-384", "rsb-a2", "convnext-in1k",
                   "linear", "tiny")
# Which recipe a run gets without --recipe: the first whose model glob matches (linear probing: "linear").
DEFAULT_RECIPES = (("convnext*", "table8"), ("*", "table7"))


@dataclass(frozen=True, kw_only=True)
class ClsConfig(TrainingRunConfig):
    """Everything an ImageNet fine-tuning or linear-probing run depends on (values without default: the recipe;
    the fields every training stage shares are :class:`TrainingRunConfig`'s)."""

    # --- what runs
    protocol: str = setting("finetune (all weights train) or linear (frozen backbone in eval mode, linear head)",
                            choices=PROTOCOLS)
    weights: str = setting("pretrained weights: any file python -m downstream.convert reads (encoder_timm.pth, a "
                           "pretraining checkpoint, a timm checkpoint, the released SparK files...; with --eval-only "
                           "a fine-tuning checkpoint or a classifier), or 'none' for random initialisation", "")
    trust_weights: bool = setting("unpickle --weights fully even if it holds Python objects beyond tensors and plain "
                                  "values (that can run code from the file: only for files you trust)", False)
    data: str = setting(f"data root holding train/ and val/ in ImageNet layout (class sub-folders); '{DEMO_DATA}': "
                        "the embedded demo set (the tiny recipe's)", "")
    eval_only: bool = setting("only evaluate --weights on val/ and write result.json", False)
    # --- images
    input_size: int = setting("training and test resolution in pixels")
    crop_pct: float = setting("test crop: resize to input_size / crop_pct, then crop input_size (timm crop_pct)")
    crop_mode: str = setting("test crop mode (timm): center, squash (resize to a square, no crop), border",
                             choices=CROP_MODES)
    interpolation: str = setting("resize interpolation (train and test)", choices=INTERPOLATIONS)
    hflip: float = setting("horizontal flip probability")
    color_jitter: float = setting("colour jitter strength (timm turns it off when --aa is set)")
    aa: str | None = setting("automatic augmentation: a timm string (rand-m9-mstd0.5-inc1, v0, augmix-...), "
                             "trivialaugment-wide (torchvision's, as the published code), or none")
    reprob: float = setting("random erasing probability")
    remode: str = setting("random erasing mode (timm): pixel, rand or const", choices=("pixel", "rand", "const"))
    aug_repeats: int = setting("repeated augmentation: copies of each image per epoch (timm RepeatAugSampler; "
                               "0: off)")
    # --- mixing and loss
    mixup: float = setting("mixup alpha (0: off)")
    cutmix: float = setting("cutmix alpha (0: off)")
    mixup_prob: float = setting("probability of mixing a batch")
    mixup_switch_prob: float = setting("probability of cutmix instead of mixup when both are on")
    mixup_mode: str = setting("mix per batch, pair or elem", choices=("batch", "pair", "elem"))
    smoothing: float = setting("label smoothing (inside the mixed targets when mixing is on)")
    bce_loss: bool = setting("binary cross-entropy (timm BinaryCrossEntropy) instead of soft-target cross-entropy")
    bce_target_thresh: float | None = setting("binarise BCE targets above this value (none: keep them soft)")
    # --- model
    drop: float = setting("dropout rate before the classifier")
    ls_init_value: float | None = setting("layer-scale init of ConvNeXt-style blocks (timm model argument "
                                          "ls_init_value; none: the model's default)", None)
    sync_bn: bool = setting("synchronise BatchNorm statistics over ranks (multi-rank runs)")
    # --- optimisation
    opt: str = setting("optimiser (timm create_optimizer_v2)", choices=OPTIMIZERS)
    opt_eps: float | None = setting("optimiser epsilon (none: timm's default)")
    lamb_bias_correction: bool = setting("LAMB: bias-corrected moments")
    lamb_always_adapt: bool = setting("LAMB: apply the trust ratio to parameters without weight decay too")
    layer_decay: float | None = setting("layer-wise lr decay factor (none: off)")
    layer_decay_groups: str = setting("layer grouping of the decay: timm (its per-block group_matcher) or published "
                                      "(SparK code: 8 groups for ResNet-50, 12 + head for ConvNeXt)",
                                      choices=LAYER_DECAY_GROUPS)
    eval_batch_size: int = setting("images per rank per evaluation pass (0: twice batch_size)", 0)
    ema_decays: tuple[float, ...] = setting("decays of the weight EMAs tracked and evaluated (timm ModelEmaV3; "
                                            "0: none)", nargs="+")
    eval_every: int = setting("evaluate every N epochs (and always after the last)", 1)

    def validate(self) -> None:
        super().validate()
        require_all([
            (self.eval_batch_size >= 0, f"eval_batch_size must be >= 0, got {self.eval_batch_size}"),
            (self.input_size >= 32, f"input_size must be at least 32, got {self.input_size}"),
            (0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}"),
            (all(0 <= d < 1 for d in self.ema_decays),
             f"ema_decays must lie in [0, 1) (0: none), got {list(self.ema_decays)}"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (self.aug_repeats >= 0 and self.eval_every > 0, "aug_repeats must be >= 0 and eval_every positive"),
        ])


SCHEMA: ConfigSchema[ClsConfig] = ConfigSchema(ClsConfig, PresetStore("downstream.cls.recipes", "recipe"))


def default_recipe(model: str | None, protocol: str | None) -> str:
    """The recipe of a run given without ``--recipe``: ``linear`` for linear probing, else by model family."""
    if protocol == "linear":
        return "linear"
    return next(recipe for glob, recipe in DEFAULT_RECIPES if fnmatch.fnmatchcase(model or "", glob))


def resolve_config(recipe: str | None = None, overrides: Mapping[str, Any] | None = None,
                   world_size: int = 1) -> ClsConfig:
    """The complete configuration of a run on ``world_size`` ranks.

    ``recipe`` None picks :func:`default_recipe` from the overrides' model and protocol. Raises
    :class:`ConfigError` (one line) for an unknown recipe (listing the known ones), unknown keys, bad values, or a
    global batch that ``batch_size x world_size`` does not divide. EMA decays of 0 are dropped (0: none).
    """
    overrides = dict(overrides or {})
    recipe = recipe or default_recipe(overrides.get("model"), overrides.get("protocol"))
    cfg = SCHEMA.resolve(recipe, overrides, world_size)
    return dataclasses.replace(cfg, ema_decays=tuple(d for d in cfg.ema_decays if d > 0))


def require_data(cfg: ClsConfig) -> None:
    """A run needs ``--data``: only a recipe that names the embedded demo set (``tiny``) runs without it."""
    if not cfg.data:
        raise ConfigError(f"--data is required with recipe {cfg.preset!r}: a root with train/ and val/ in ImageNet "
                          f"layout (--recipe tiny, or --data {DEMO_DATA}, uses the embedded demo set)")
