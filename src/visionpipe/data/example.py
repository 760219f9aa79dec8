"""The one record every data source yields, whatever its on-disk format."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Example:
    """One image with whichever targets its source provides.

    - ``image``: uint8 array, shape (H, W, 3), RGB.
    - ``label``: class index for classification, or None.
    - ``mask``: uint8 array, shape (H, W), a class id per pixel. Sources of segmentation data
      give ids into the task's class names (pairs, tfds: by ``mask_values``); ``shapes`` gives
      0 = background and k = shape class k-1, and prepare names id 0 "background".
    - ``boxes``: float32 array (N, 4) in absolute pixels, ``[x_min, y_min, x_max, y_max]``,
      with max edges exclusive (a box over columns 3..5 is x_min=3, x_max=6).
    - ``box_labels``: int32 array (N,), class index of each box.
    - ``difficult``: bool array (N,), boxes PASCAL VOC marks difficult (evaluation ignores
      them), or None when the source has no such flag.
    """

    id: str
    image: np.ndarray
    label: int | None = None
    mask: np.ndarray | None = None
    boxes: np.ndarray | None = None
    box_labels: np.ndarray | None = None
    difficult: np.ndarray | None = None
