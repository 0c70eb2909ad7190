"""MNIST digits turned back into pen strokes, so a browser test can draw real test digits the way a person would:
threshold the 28 x 28 image, thin it to a one-pixel skeleton (Zhang-Suen), and follow the skeleton's pixels
as polylines. Pure numpy: no image-processing library for 28 x 28 pixels."""

from __future__ import annotations

import numpy as np

INK_THRESHOLD = 128  # of 255: MNIST's anti-aliased rim is left out, its strokes' cores kept
# The eight neighbours P2..P9 of Zhang and Suen's paper, clockwise from north, as (row, column) steps.
NEIGHBOURS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))

Point = tuple[int, int]  # (x, y): column, row


def skeleton(image: np.ndarray, threshold: int = INK_THRESHOLD) -> np.ndarray:
    """The ink of a grey image (bright ink on black, as MNIST stores it) thinned to lines one pixel wide."""
    ink = np.pad(image >= threshold, 1)  # a blank border: np.roll then brings in no ink from the other side
    while True:
        removed = 0
        for first_pass in (True, False):
            around = [np.roll(ink, (-dr, -dc), axis=(0, 1)) for dr, dc in NEIGHBOURS]
            p2, _, p4, _, p6, _, p8, _ = around
            count = sum(a.astype(np.int8) for a in around)
            # Paper-to-ink changes going once round the pixel: exactly one means removing it splits no stroke.
            changes = sum((~a & b).astype(np.int8) for a, b in zip(around, around[1:] + around[:1], strict=True))
            if first_pass:  # south-east boundary and north-west corner
                side = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
            else:  # north-west boundary and south-east corner
                side = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
            deletable = ink & (count >= 2) & (count <= 6) & (changes == 1) & side
            ink &= ~deletable
            removed += int(deletable.sum())
        if not removed:
            return ink[1:-1, 1:-1]


def polylines(lines: np.ndarray) -> list[list[Point]]:
    """The skeleton's pixels as pen strokes. A stroke starts at a line's free end where there is one (else where a
    branch leaves a drawn line), follows undrawn neighbours, straight on first, and closes a loop it comes round."""
    pixels = {(int(c), int(r)) for r, c in zip(*np.nonzero(lines), strict=True)}

    def neighbours(point: Point) -> list[Point]:
        x, y = point
        return [(x + dc, y + dr) for dr, dc in NEIGHBOURS if (x + dc, y + dr) in pixels]

    def straightness(stroke: list[Point], step: Point) -> float:
        (x0, y0), (x1, y1) = stroke[-2] if len(stroke) > 1 else stroke[-1], stroke[-1]
        dx, dy = step[0] - x1, step[1] - y1
        return dx * (x1 - x0) + dy * (y1 - y0) - 0.1 * abs(dx * dy)  # ahead first, orthogonal before diagonal

    drawn: set[Point] = set()
    strokes = []
    while undrawn := sorted(pixels - drawn):
        ends = [p for p in undrawn if len(neighbours(p)) <= 1]
        branches = [p for p in sorted(drawn) if any(n not in drawn for n in neighbours(p))]
        stroke = [(ends or branches or undrawn)[0]]
        drawn.add(stroke[0])
        while nexts := [n for n in neighbours(stroke[-1]) if n not in drawn]:
            step = max(nexts, key=lambda n, stroke=stroke: straightness(stroke, n))
            drawn.add(step)
            stroke.append(step)
        closing = [n for n in neighbours(stroke[-1]) if n not in stroke[-3:] and n in drawn]
        # A one-pixel twig off a drawn line (where the thinning left a corner two pixels thick) is under the pen
        # already: not worth a stroke of its own.
        if ends or len(stroke) > 2:
            strokes.append(stroke + closing[:1])
    return strokes


def digit_strokes(image: np.ndarray, scale: int = 10) -> list[list[Point]]:
    """A 28 x 28 MNIST digit as strokes on a canvas `scale` times larger (pixel centres, whole canvas pixels)."""
    return [
        [(x * scale + scale // 2, y * scale + scale // 2) for x, y in stroke] for stroke in polylines(skeleton(image))
    ]
