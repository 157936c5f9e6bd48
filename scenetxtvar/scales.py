"""Scale schedules: Infinity's h/w templates and pn presets, and VAR's patch-number schedules.

A schedule is a list of ``(t, h, w)`` token grids, coarse to fine, with ``t = 1`` for images
and ``(h_0, w_0) = (1, 1)``. The last grid is the tokenizer's latent grid; the image is
``stride * h_K`` by ``stride * w_K`` pixels (stride 16 for the released VAEs).
"""

from __future__ import annotations

from collections.abc import Sequence

Schedule = list[tuple[int, int, int]]

# The 13 (h, w) grids of the 1M schedule of each base ratio h/w (official table). The inverse
# ratios use the transposed grids.
_BASE_1M_GRIDS: dict[float, list[tuple[int, int]]] = {
    1.0: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
          (40, 40), (48, 48), (64, 64)],
    1.25: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
           (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)],
    1.5: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
          (48, 32), (63, 42), (78, 52)],
    1.75: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
           (56, 32), (70, 40), (84, 48)],
    2.0: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
          (60, 30), (74, 37), (90, 45)],
    2.5: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
          (65, 26), (80, 32), (100, 40)],
    3.0: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
          (72, 24), (90, 30), (111, 37)],
}  # fmt: skip

# Number of scales of each pixel-count preset: every pn schedule is a prefix of the 1M one.
PN_NUM_SCALES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _inverse_ratio(r: float) -> float:
    # The official code spells the inverse ratios as int(1000 / r) / 1000 (0.8, 0.75, 0.666, ...).
    return int(1000 / r) / 1000


def _build_templates() -> dict[float, list[tuple[int, int]]]:
    grids: dict[float, list[tuple[int, int]]] = {}
    for ratio, hw in _BASE_1M_GRIDS.items():
        grids[ratio] = hw
        if ratio != 1.0:
            grids[_inverse_ratio(ratio)] = [(w, h) for h, w in hw]
    return grids


TEMPLATE_1M_GRIDS: dict[float, list[tuple[int, int]]] = _build_templates()
# Official order: 1.0, then each base ratio followed by its inverse.
H_DIV_W_TEMPLATES: list[float] = list(TEMPLATE_1M_GRIDS)


def nearest_template(h_div_w: float) -> float:
    """The h/w template closest to ``h_div_w`` (official |h/w - template| rule)."""
    if not h_div_w > 0:
        raise ValueError(f"h_div_w must be positive, got {h_div_w}")
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def get_schedule(h_div_w: float = 1.0, pn: str = "0.06M") -> Schedule:
    """The official ``(1, h, w)`` schedule for the template nearest ``h_div_w`` and preset ``pn``."""
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"pn must be one of {sorted(PN_NUM_SCALES)}, got {pn!r}")
    grids = TEMPLATE_1M_GRIDS[nearest_template(h_div_w)]
    return [(1, h, w) for h, w in grids[: PN_NUM_SCALES[pn]]]


def pixel_size(schedule: Sequence[Sequence[int]], stride: int = 16) -> tuple[int, int]:
    """Image (H, W) in pixels for a schedule: ``stride`` times the last grid."""
    _, h, w = normalize_schedule(schedule)[-1]
    return stride * h, stride * w


def normalize_schedule(schedule: Sequence[Sequence[int]]) -> Schedule:
    """Accept (h, w) or (t, h, w) entries; return validated ``(1, h, w)`` tuples."""
    if len(schedule) == 0:
        raise ValueError("scale_schedule is empty")
    out: Schedule = []
    for entry in schedule:
        entry = tuple(int(v) for v in entry)
        if len(entry) == 2:
            entry = (1, *entry)
        if len(entry) != 3 or min(entry) < 1:
            raise ValueError(f"scale_schedule entries must be (t, h, w) with positive sizes, got {entry}")
        out.append(entry)
    return out


def sequence_length(schedule: Sequence[Sequence[int]]) -> int:
    """Total number of tokens L = sum_k t_k h_k w_k."""
    return sum(t * h * w for t, h, w in normalize_schedule(schedule))


def scale_lengths(schedule: Sequence[Sequence[int]]) -> list[int]:
    """Tokens per scale."""
    return [t * h * w for t, h, w in normalize_schedule(schedule)]


def rope_reference_grid(schedule: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The grid RoPE positions are spread over (``rope2d_normalized_by_hw=2``).

    For an official schedule this is the final grid of its template's 1M schedule (a 256x256
    run uses positions of the 64x64 grid). A custom schedule that is not a prefix of any
    template is normalised by its own last grid.
    """
    hw = [(h, w) for _, h, w in normalize_schedule(schedule)]
    for grids in TEMPLATE_1M_GRIDS.values():
        if grids[: len(hw)] == hw:
            return grids[-1]
    return hw[-1]


# VAR's patch-number schedules (square grids) for the VQ backend, keyed by image side.
VAR_PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}


def var_schedule(resolution: int = 256) -> Schedule:
    """VAR's schedule for a square image of ``resolution`` pixels, as ``(1, pn, pn)`` tuples."""
    if resolution not in VAR_PATCH_NUMS:
        raise ValueError(f"VAR schedules exist for resolutions {sorted(VAR_PATCH_NUMS)}, got {resolution}")
    return [(1, pn, pn) for pn in VAR_PATCH_NUMS[resolution]]
