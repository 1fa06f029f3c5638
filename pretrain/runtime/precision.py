"""Precision and memory layout chosen by the hardware, for every stage.

The rule (:func:`resolve_precision`, pure, given a device's :class:`Capabilities`):

- ``amp='auto'``: bf16 autocast on CUDA devices that compute bf16 (compute capability 8.0 and newer) and on
  CPUs with native bf16 instructions (AVX512-BF16 or AMX on x86, the BF16 extension on Arm) that oneDNN
  and ATen are allowed to use; plain fp32 everywhere else. Without native instructions oneDNN emulates
  bf16: a ResNet training step then runs about 8x slower than in fp32 (measured on an AVX2-only CPU).
- ``channels_last='auto'``: on for CPUs, in bf16 and in fp32 alike (oneDNN's convolutions are NHWC-native:
  a ResNet-50 sparse fp32 step takes 0.92x the NCHW time with and without AVX-512, ResNet-18 at 128 px
  0.76x on an emulated AVX2-only CPU; ConvNeXt-Atto, whose blocks permute to NHWC themselves, pays 1.04x
  to 1.16x: ``--channels-last off`` for ConvNeXts on fp32 CPUs), and for CUDA devices with bf16 tensor
  cores (compute capability 8.0+, where cuDNN's tensor-core kernels want NHWC); off on older GPUs, whose
  fp32 convolutions have no tensor cores to feed.
- Explicit ``bf16`` / ``none`` and ``on`` / ``off`` are honoured; ``bf16`` on a device without native bf16
  runs with a one-line warning that it is emulated and slow.

:func:`probe_capabilities` reads the device (torch imported lazily); :func:`choose_precision` does both.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Capabilities", "Precision", "choose_precision", "probe_capabilities", "resolve_precision"]

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) below which bf16 runs emulated.
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class Capabilities:
    """What a device computes natively, as far as the precision rule cares."""

    device_type: str  # "cpu" or "cuda"
    bf16_native: bool  # bf16 arithmetic in hardware, usable by the kernels torch calls
    name: str = ""  # device or CPU model name
    detail: str = ""  # the evidence (CPU flags, oneDNN/ATen limits, compute capability)


@dataclass(frozen=True)
class Precision:
    """The resolved choice: autocast dtype, memory layout, and why."""

    amp: str  # "bf16" or "none"
    channels_last: bool
    device_type: str
    reason: str
    warning: str | None = None
    bf16_native: bool = False
    device_name: str = ""

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The autocast context of this choice on ``device`` (disabled for fp32)."""
        import torch

        device_type = torch.device(device).type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.amp == "bf16")

    def describe(self) -> str:
        """One line for the first log line of a run."""
        layout = "channels-last" if self.channels_last else "NCHW"
        amp = "bf16 autocast" if self.amp == "bf16" else "fp32"
        return f"precision {amp}, {layout} on {self.device_type} ({self.device_name}): {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_precision(amp: str, channels_last: str | bool, caps: Capabilities) -> Precision:
    """Apply the rule of this module to the requested ``amp`` (auto/bf16/none) and ``channels_last``
    (auto/on/off or a bool) on a device with capabilities ``caps``."""
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be auto, bf16 or none; got {amp!r}")
    if isinstance(channels_last, bool):
        channels_last = "on" if channels_last else "off"
    if channels_last not in ("auto", "on", "off"):
        raise ValueError(f"channels_last must be auto, on or off; got {channels_last!r}")
    where = "this GPU" if caps.device_type == "cuda" else "this CPU"
    native = f"{where} computes bf16 natively" if caps.bf16_native else f"{where} has no native bf16"
    warning = None
    if amp == "auto":
        chosen = "bf16" if caps.bf16_native else "none"
        reasons = [f"amp auto -> {'bf16' if chosen == 'bf16' else 'fp32'}: {native}"]
    else:
        chosen = amp
        reasons = [f"amp {amp} as requested"]
        if amp == "bf16" and not caps.bf16_native:
            warning = (f"--amp bf16 on {caps.name or where} without native bf16 ({caps.detail}): bf16 is emulated "
                       "and several times slower than fp32; use --amp auto or none")
    if channels_last == "auto":
        layout = caps.device_type == "cpu" or caps.bf16_native
        why = {("cpu", True): "CPU: oneDNN convolutions are NHWC-native", ("cuda", True): "GPU with tensor cores",
               ("cuda", False): "GPU without bf16 tensor cores"}[caps.device_type, layout]
        reasons.append(f"channels-last auto -> {'on' if layout else 'off'} ({why})")
    else:
        layout = channels_last == "on"
        reasons.append(f"channels-last {channels_last} as requested")
    return Precision(chosen, layout, caps.device_type, "; ".join(reasons), warning, caps.bf16_native, caps.name)


def _cpuinfo_field(prefix: str) -> str:
    """The value of the first ``/proc/cpuinfo`` line starting with ``prefix`` ('' where there is none)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith(prefix) and ":" in line:
                return line.split(":", 1)[1].strip()
    return ""


def _cpu_capabilities() -> Capabilities:
    import torch

    onednn_limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    aten = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("aarch64", "arm64"):
        hardware = "bf16" in _cpuinfo_field("Features").split()  # the Arm BF16 extension
        evidence = f"Arm bf16={'yes' if hardware else 'no'}"
    else:
        avx512_bf16, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
        hardware = avx512_bf16 or amx
        evidence = f"avx512_bf16={'yes' if avx512_bf16 else 'no'}, amx={'yes' if amx else 'no'}"
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    limited = onednn_limit in ONEDNN_ISAS_WITHOUT_BF16  # oneDNN told not to use its bf16 instructions
    detail = f"{evidence}, ATen {aten}" + (f", ONEDNN_MAX_CPU_ISA={onednn_limit}" if onednn_limit else "")
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    return Capabilities("cpu", hardware and onednn and not limited, name, detail)


def probe_capabilities(device: torch.device | str) -> Capabilities:
    """The :class:`Capabilities` of ``device`` (a CUDA device or the CPU this process runs on)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        native = major >= 8
        return Capabilities("cuda", native, torch.cuda.get_device_name(index), f"compute capability {major}.{minor}")
    return _cpu_capabilities()


def choose_precision(device: torch.device | str, amp: str = "auto", channels_last: str | bool = "auto") -> Precision:
    """:func:`resolve_precision` on the probed capabilities of ``device``."""
    return resolve_precision(amp, channels_last, probe_capabilities(device))
