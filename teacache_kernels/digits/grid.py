"""Sample grids as PNG: one labelled row per run, the digits enlarged with nearest-neighbour pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def save_grid(rows: Sequence[tuple[str, torch.Tensor]], path, *, scale: int = 6, gap: int = 3, label_width: int = 330):
    """`rows`: (label, images [N, H, W] in [-1, 1]) pairs, same N per row. Writes `path`; returns it."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("save_grid needs at least one row")
    n, h, w = rows[0][1].shape
    for label, images in rows:
        if images.shape != (n, h, w):
            raise ValueError(f"row {label!r} has images of shape {tuple(images.shape)}, the first row {(n, h, w)}")
    cell_w, cell_h = w * scale + gap, h * scale + gap
    canvas = Image.new("L", (label_width + n * cell_w + gap, len(rows) * cell_h + gap), color=255)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, cell_h // 4))
    for r, (label, images) in enumerate(rows):
        y = gap + r * cell_h
        draw.multiline_text((6, y + 2), label, fill=0, font=font, spacing=2)
        # Ink dark on white, as the digits are written: dataset value 16 (image +1) is black.
        pixels = ((1 - images.float().clamp(-1, 1)) * 127.5).round().to(torch.uint8).cpu()  # host-ok: writing a PNG
        for i in range(n):
            tile = Image.fromarray(pixels[i].numpy(), mode="L").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_width + gap + i * cell_w, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
