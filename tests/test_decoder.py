import pytest
import torch

from pretrain.decoder import LightDecoder


def _appendix_parameter_count(width: int, steps: int) -> int:
    """Parameters of appendix A's LightDecoder(width, 2**steps), counted by hand."""
    total = 0
    for i in range(steps):
        cin, cout = width // 2**i, width // 2 ** (i + 1)
        total += cin * cin * 16 + cin  # ConvTranspose2d(cin, cin, 4, 2, 1, bias=True)
        total += cin * cin * 9 + 2 * cin  # 3x3 conv (no bias) + BatchNorm2d(cin)
        total += cin * cout * 9 + 2 * cout  # 3x3 conv (no bias) + BatchNorm2d(cout)
    last = width // 2**steps
    return total + last * 3 + 3  # 1x1 conv to RGB


def test_parameter_count_matches_appendix_for_width_768() -> None:
    decoder = LightDecoder(768, 32)
    assert sum(p.numel() for p in decoder.parameters()) == _appendix_parameter_count(768, 5)
    assert decoder.widths == [768, 384, 192, 96, 48, 24]


def test_forward_shapes_and_skip_inputs() -> None:
    decoder = LightDecoder(64, 32).eval()
    to_dec = [torch.randn(2, 64 // 2**i, 2 * 2**i, 3 * 2**i) for i in range(4)]
    out = decoder(to_dec)
    assert out.shape == (2, 3, 64, 96)
    # the finer inputs are added before their blocks: changing one changes the output
    to_dec[3] = to_dec[3] + 1
    assert not torch.allclose(decoder(to_dec), out)
    assert decoder([to_dec[0], None, None, None]).shape == out.shape


def test_block_structure() -> None:
    block = LightDecoder(64, 32).blocks[0]
    kinds = [type(m).__name__ for m in block]
    assert kinds == ["ConvTranspose2d", "Conv2d", "BatchNorm2d", "ReLU6", "Conv2d", "BatchNorm2d"]
    assert block[0].kernel_size == (4, 4) and block[0].stride == (2, 2) and block[0].bias is not None


@pytest.mark.parametrize(("width", "ratio"), [(768, 24), (100, 32)])
def test_bad_settings_raise(width: int, ratio: int) -> None:
    with pytest.raises(ValueError):
        LightDecoder(width, ratio)
