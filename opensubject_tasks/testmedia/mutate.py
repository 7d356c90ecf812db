"""Mutations of valid video files, for fuzzing the probe and curation paths: bit
flips, truncations, zeroed or swapped MP4 boxes, zeroed regions and concatenations.

Deterministic for a seed, so a failing case can be rebuilt from its name alone.
"""
from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path

KINDS = ("bitflip", "truncate", "zero_box", "swap_boxes", "zero_region", "concat", "box_size")


def top_level_boxes(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, size, type) of the top-level ISO-BMFF boxes that parse cleanly."""
    boxes, off = [], 0
    while off + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[off:off + 8])
        if size == 1 and off + 16 <= len(data):
            size = struct.unpack(">Q", data[off + 8:off + 16])[0]
        if size < 8 or off + size > len(data):
            break
        boxes.append((off, size, kind))
        off += size
    return boxes


def mutate(data: bytes, kind: str, rng: random.Random, other: bytes = b"") -> bytes:
    buf = bytearray(data)
    boxes = top_level_boxes(data)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 64)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        buf = buf[: rng.randrange(1, len(buf))]
    elif kind == "zero_box" and boxes:
        off, size, _ = rng.choice(boxes)
        buf[off:off + size] = bytes(size)
    elif kind == "swap_boxes" and len(boxes) >= 2:
        a, b = rng.sample(boxes, 2)
        (o1, s1, _), (o2, s2, _) = sorted([a, b])
        buf = buf[:o1] + buf[o2:o2 + s2] + buf[o1 + s1:o2] + buf[o1:o1 + s1] + buf[o2 + s2:]
    elif kind == "box_size" and boxes:
        off, _, _ = rng.choice(boxes)
        buf[off:off + 4] = struct.pack(">I", rng.choice([0, 1, 7, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    elif kind == "zero_region":
        start = rng.randrange(len(buf))
        end = min(len(buf), start + rng.randint(1, max(1, len(buf) // 4)))
        buf[start:end] = bytes(end - start)
    elif kind == "concat":
        buf = buf + bytearray(other or data)
    else:  # a box mutation on a file without parseable boxes: flip bits instead
        return mutate(data, "bitflip", rng)
    return bytes(buf)


def mutations(seeds: list[Path], count: int, out_dir: Path, seed: int = 0) -> Iterator[Path]:
    """Write ``count`` mutated files made from the seed videos; yields their paths."""
    rng = random.Random(seed)
    originals = [p.read_bytes() for p in seeds]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        j = rng.randrange(len(originals))
        other = originals[(j + 1) % len(originals)]
        other = other[: rng.randrange(1, len(other) + 1)]
        data = mutate(originals[j], kind, rng, other=other)
        if rng.random() < 0.5:  # compound damage, as real broken files often have
            data = mutate(data, rng.choice(KINDS), rng, other=other)
        path = out_dir / f"m{i:04d}_{kind}_{seeds[j].stem}.mp4"
        path.write_bytes(data)
        yield path
