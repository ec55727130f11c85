"""CLIP's image preprocessing on the device, for pixels that are already there.

The safety checker and the fidelity score both look at freshly decoded images through a CLIP vision
tower. The stock path copies each image to the CPU, converts it to PIL, resizes it there and copies it
back; this resizes the decoded tensor where it lies (bicubic with antialiasing, as PIL filters), crops
and normalises it. The result differs from PIL's by interpolation rounding only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def clip_input(
    pixels: torch.Tensor,
    *,
    shortest_edge: int,
    crop: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] → shortest edge resized, centre-cropped to (height, width), normalised."""
    _, _, height, width = pixels.shape
    short, long = min(height, width), max(height, width)
    new_long = int(shortest_edge * long / short)
    size = (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)
    x = pixels.float()
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    crop_h, crop_w = crop
    top = max(0, (x.shape[2] - crop_h) // 2)
    left = max(0, (x.shape[3] - crop_w) // 2)
    x = x[:, :, top : top + crop_h, left : left + crop_w]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
