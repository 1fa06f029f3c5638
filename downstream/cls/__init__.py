"""ImageNet fine-tuning and linear probing with timm (``python -m downstream.cls``), recipes as data.

- :mod:`.config`: :class:`~.config.ClsConfig` and its recipes (``recipes/*.yaml``: tables 7 and 8 of the paper,
  the published code's variants, linear probing, the embedded demo); imports neither torch nor timm;
- :mod:`.runner`: one run on the shared machinery of :mod:`pretrain.runtime` (task, hooks, checkpoints);
- :mod:`.layer_decay`: the published code's layer-wise lr decay layout for ResNets and ConvNeXts.

Importing this package imports neither torch nor timm.
"""
