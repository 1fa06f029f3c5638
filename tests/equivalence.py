"""Comparisons shared by the equivalence tests (fp32 and float64 backends, channels-last, bf16, CUDA, DDP): tensors
by name, each on its own scale, so that a small tensor is checked as closely as a large one."""

from __future__ import annotations

from collections.abc import Mapping

import torch

# A tensor whose largest expected magnitude is below FLOOR x the largest of all tensors compared is measured on
# that floor instead: such gradients vanish analytically (a bias right before a BatchNorm in training, as in
# ResNeSt's split attention) and are float noise, in float64 up to 2e-14 of the largest gradient. Every other
# tensor is measured on its own largest magnitude.
FLOOR = 1e-4


def per_tensor_errors(
    actual: Mapping[str, torch.Tensor | None], expected: Mapping[str, torch.Tensor | None], floor: float = FLOOR
) -> dict[str, float]:
    """Largest absolute difference of each named tensor over its own largest expected magnitude (or over
    ``floor`` x the largest magnitude of all, when that is bigger). Both sides must hold the same names with
    tensors in the same places (a gradient missing on one side only is an error of ``inf``)."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))[:5]
    present = {k: e.detach().double() for k, e in expected.items() if e is not None}
    overall = max((float(e.abs().max()) for e in present.values() if e.numel()), default=0.0)
    errors = {}
    for key, wanted in present.items():
        got = actual[key]
        if got is None or got.shape != wanted.shape:
            errors[key] = float("inf")
            continue
        scale = max(float(wanted.abs().max()) if wanted.numel() else 0.0, floor * overall, 1e-300)
        errors[key] = float((got.detach().double() - wanted).abs().max()) / scale
    errors.update({k: float("inf") for k, e in expected.items() if e is None and actual[k] is not None})
    return errors


def assert_per_tensor_close(
    actual: Mapping[str, torch.Tensor | None], expected: Mapping[str, torch.Tensor | None], rtol: float,
    floor: float = FLOOR, what: str = "tensor",
) -> None:
    """Every named tensor of ``actual`` equals ``expected`` within ``rtol`` of its own scale (see
    :func:`per_tensor_errors`); the message names the worst ones."""
    errors = per_tensor_errors(actual, expected, floor)
    bad = sorted(((e, k) for k, e in errors.items() if not e <= rtol), reverse=True)
    assert not bad, f"{len(bad)} of {len(errors)} {what}s off by more than {rtol:g} of their scale, worst: " + \
        ", ".join(f"{k} {e:.2g}" for e, k in bad[:4])


def relative_l2_errors(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """``|actual - expected| / |expected|`` (Euclidean norms) of each named tensor of ``expected``."""
    return {k: float((actual[k].detach().double() - e.detach().double()).norm() / e.detach().double().norm()
                     .clamp_min(1e-300)) for k, e in expected.items()}


def named_gradients(module: torch.nn.Module, **extra: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """``{name: parameter.grad}`` of ``module`` (None where no gradient arrived), plus ``extra`` tensors' grads."""
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads.update({name: t.grad for name, t in extra.items()})
    return grads
