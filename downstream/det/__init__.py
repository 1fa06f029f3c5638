"""COCO detection and instance segmentation with Detectron2 (Mask R-CNN, table 9 and 10 of the paper).

Importing this package applies the Detectron2 compatibility shims of :mod:`.compat` (only those the
installed detectron2 needs), so every module below may import detectron2. Importing it imports neither torch
nor detectron2; :mod:`.install` installs detectron2 where it is missing.
"""

from .compat import apply as _apply_compat

_apply_compat()
