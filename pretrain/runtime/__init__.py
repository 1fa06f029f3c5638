"""The run machinery every stage shares (pretraining, fine-tuning, detection, the sweep).

Importing this package imports nothing heavy: ``config``, ``result``, ``io``, ``cli`` and ``signals`` need no
torch, so the sweep and the result tables can use them; ``checkpoint``, ``distributed``, ``runlog``, ``loop``
and the probing half of ``precision`` import torch.
"""
