"""SparK pretraining: sparse encoder for any timm convnet, light decoder, masked-patch objective."""

from .decoder import LightDecoder
from .encoder import SparseEncoder
from .spark import SparK, build_spark

__all__ = ["LightDecoder", "SparK", "SparseEncoder", "build_spark"]
