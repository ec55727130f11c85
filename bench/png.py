"""A batch's PNG encoding, as the job system stores a finished batch: one image after another (stock
`Image.save` in a loop) against `store.png_bytes_of` (the images side by side on encoder threads).

    python bench/png.py [--batch 8] [--size 512] [--reps 5]

Prints a table, then `serial_s=… ours_s=… speedup=…` as its last line. The images are photographs' stand-ins:
smooth gradients with a little noise, which PNG compresses about as well as it does generated images.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np
from PIL import Image

from i2p2i_bot.store import png_bytes_of


def images(batch: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    made = []
    for k in range(batch):
        base = ramp[None, :, None] + ramp[:, None, None] * 0.3 + np.array([0, 20 * k, 40], dtype=np.float32)
        noisy = base + rng.normal(0, 6, (size, size, 3))
        made.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return made


def serial(batch: list[Image.Image]) -> list[bytes]:
    out = []
    for image in batch:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    batch = images(args.batch, args.size)
    assert serial(batch) == png_bytes_of(batch)  # the same files, byte for byte
    times: dict[str, list[float]] = {"serial": [], "ours": []}
    for _ in range(args.reps):
        for name, encode in (("serial", serial), ("ours", png_bytes_of)):
            started = time.perf_counter()
            encode(batch)
            times[name].append(time.perf_counter() - started)
    best = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.batch} images of {args.size}², {os.cpu_count()} CPUs, median of {args.reps}")
    print(f"{'encoding':<10} {'s/batch':>8} {'ms/image':>9}")
    for name, seconds in best.items():
        print(f"{name:<10} {seconds:>8.3f} {1000 * seconds / args.batch:>9.1f}")
    print(
        f"serial_s={best['serial']:.4f} ours_s={best['ours']:.4f} speedup={best['serial'] / best['ours']:.2f}"
    )


if __name__ == "__main__":
    main()
