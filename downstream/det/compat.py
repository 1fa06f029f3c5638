"""The suite's only monkeypatching: what an old Detectron2 needs to import and run with today's libraries.

The pure-Python Detectron2 0.6 that ``python -m downstream.det.install`` puts in place predates numpy 1.24,
Pillow 10 and has no compiled ``detectron2._C``. :func:`apply` (run when ``downstream.det`` is imported, so
before any of its modules imports detectron2) adds exactly what the installed detectron2 needs: each shim is
applied only if the installed detectron2's sources use the missing name (or its compiled ops are absent)
*and* the library at hand lacks it. A source build of upstream detectron2 (current numpy/Pillow names,
compiled ops) gets none. Code that imports detectron2 before ``downstream.det`` does so without the shims.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
import warnings
from pathlib import Path

__all__ = ["apply", "detectron2_root", "has_compiled_ops", "setup_local_process_group"]

# numpy 1.24 removed these aliases of Python builtins (numpy 2 brought back ``np.bool``, as numpy's bool_).
NUMPY_ALIASES = {"bool": bool, "int": int, "float": float, "object": object, "str": str}


def detectron2_root() -> Path | None:
    """Folder of the installed ``detectron2`` package, found without importing it; None if absent."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def has_compiled_ops(root: Path) -> bool:
    """Whether detectron2 at ``root`` was built with its C++/CUDA extension ``detectron2._C``."""
    return any(root.glob("_C.*.so")) or any(root.glob("_C.*.pyd")) or any(root.glob("_C.so"))


def _sources(root: Path) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in sorted(root.rglob("*.py")))


def _stand_in_ops() -> types.ModuleType:
    module = types.ModuleType("detectron2._C", "Stand-in for the missing compiled ops (downstream.det.compat).")

    def missing(name: str) -> object:
        raise AttributeError(f"detectron2._C.{name}: this detectron2 was installed without its compiled C++ ops "
                             "(rotated boxes, deformable convolution, the fast COCO evaluator); build detectron2 "
                             "from source to use them")

    module.__getattr__ = missing  # PEP 562: called for every name the module lacks
    return module


def apply() -> list[str]:
    """Apply the shims the installed detectron2 needs (idempotent); returns what was applied (may be empty)."""
    root = detectron2_root()
    if root is None:
        return []
    applied = []
    if not has_compiled_ops(root) and "detectron2._C" not in sys.modules:
        # Shim 1: detectron2 0.6 from the registry's sdist has no compiled detectron2._C, yet layers/deform_conv.py,
        # layers/rotated_boxes.py, layers/roi_align_rotated.py and evaluation/fast_eval_api.py import it at module
        # level (layers/__init__ pulls in the first three). Mask R-CNN with FPN calls none of them (its ROIAlign and
        # NMS are torchvision's); the stand-in names what is missing if something does.
        sys.modules["detectron2._C"] = _stand_in_ops()
        applied.append("detectron2._C stand-in")
    sources = _sources(root)
    import numpy

    for alias, builtin in NUMPY_ALIASES.items():
        if alias not in vars(numpy) and re.search(rf"\bnp\.{alias}\b(?!_)", sources):
            # Shim 2: np.bool/np.int/np.float/np.object/np.str were removed in numpy 1.24 (np.bool returned in 2.0);
            # detectron2 0.6 uses them, e.g. structures/masks.py (np.bool), data/build.py (np.int).
            setattr(numpy, alias, builtin)
            applied.append(f"numpy.{alias}")
    from PIL import Image

    if "LINEAR" not in vars(Image) and re.search(r"\bImage\.LINEAR\b", sources):
        # Shim 3: Pillow 10 removed Image.LINEAR (an alias of BILINEAR); detectron2 0.6 evaluates it as a default
        # argument in data/transforms/transform.py (ExtentTransform), so importing detectron2.data fails without it.
        Image.LINEAR = Image.Resampling.BILINEAR
        applied.append("PIL.Image.LINEAR")
    if re.search(r"@torch\.jit\.script\b", sources):
        # Quieting, not a shim: detectron2 0.6 (modeling/box_regression.py) and fvcore (nn/focal_loss.py) run
        # torch.jit.script at import, which torch 2.9+ deprecates with a FutureWarning each time; printed before a
        # tool's one-line error it buries it. Only that message is filtered.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        applied.append("torch.jit.script deprecation warning filtered")
    return applied


def setup_local_process_group(local_world_size: int | None = None) -> None:
    """Detectron2's per-machine process group, for ranks that its ``launch()`` did not spawn (SLURM tasks, torchrun).

    ``comm.get_local_rank()`` (used by Detectron2's data loaders and DDP set-up) needs it. Newer Detectron2 has
    ``comm.create_local_process_group``; 0.6 only sets ``comm._LOCAL_PROCESS_GROUP`` inside ``launch()``, so this
    sets it the same way: every rank creates every machine's group. ``local_world_size``: ranks per machine
    (default: the visible GPUs, else all ranks). Call after the default process group is initialised.
    """
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    world = dist.get_world_size()
    local = local_world_size or min(torch.cuda.device_count() or world, world)
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(local)
        return
    if comm._LOCAL_PROCESS_GROUP is not None:
        return
    if world % local:
        raise ValueError(f"{world} ranks do not split into machines of {local}")
    for machine in range(world // local):
        group = dist.new_group(list(range(machine * local, (machine + 1) * local)))
        if machine == dist.get_rank() // local:
            comm._LOCAL_PROCESS_GROUP = group  # what launch() of Detectron2 0.6 sets
