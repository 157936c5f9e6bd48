"""Controllable sampling: load a CAR checkpoint once, then generate from prompts + layouts or control images.

Notebook use::

    from scenetxtvar.inference import load_model_and_vae, generate, read_layouts

    vae, model, text_encoder, *_ = load_model_and_vae("outputs/runs/.../checkpoints/last.ckpt")
    result = generate(model, vae, ["a shop sign"], layouts=read_layouts("layout.yaml"),
                      text_encoder=text_encoder, seed=3, cfg=3.0)
    result.images[0].save("sample.png")

``load_model_and_vae`` returns a :class:`SamplingKit` (a named tuple): ``vae``, ``model`` and the
``text_encoder`` that ``generate`` needs, plus the :class:`~scenetxtvar.training.module.PilotModule`
that holds them (teacher-forced losses) and what was loaded (:class:`CheckpointInfo`, with SHA-256).

**Layout files** (YAML or JSON): a list of images, or ``{"images": [...]}``, each::

    prompt: a shop sign that says "OPEN"   # optional: the prompt (else the one given, else made from the words)
    aspect: 1.0                             # optional h/w (nearest official template), default sampling.h_div_w
    pn: 0.06M                               # optional pixel-count preset, default sampling.pn
    font: /path/font.ttf                    # optional glyph font (or "builtin"), default sampling.font
    size: [256, 256]                        # optional (H, W) frame of the coordinates, default the output size
    texts:
      - {text: OPEN, box: [40, 96, 216, 160]}                            # x0, y0, x1, y1
      - {text: 24h, polygon: [[60, 180], [196, 180], [196, 220], [60, 220]]}  # TL, TR, BR, BL

(``words`` + ``polygons`` / ``boxes`` parallel lists, the shards' metadata format, work too.) A
layout is rendered into a glyph control with :func:`~scenetxtvar.data.glyph.render_glyph_control`
and thresholded exactly as the training data's glyph masks. Bad layouts (a point outside the
image, an empty word, an unknown font, a degenerate polygon, unknown keys) raise ``ValueError``.

**Seeds.** Images are sampled in batches of ``batch_size`` consecutive images sharing a schedule;
a batch starting at image ``i`` uses seed ``seed + i``. With ``batch_size=1`` (the default) image
``i`` has seed ``seed + i`` and is reproduced from its sidecar alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from .checkpoint import CAR_CONFIG, CAR_WEIGHTS, detect_infinity_config, read_checkpoint
from .scales import PN_NUM_SCALES, get_schedule, normalize_schedule, pixel_size

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
LAYOUT_KEYS = frozenset(
    {"prompt", "caption", "aspect", "h_div_w", "pn", "font", "size", "texts", "words", "polygons", "boxes"}
)
TEXT_KEYS = frozenset({"text", "word", "polygon", "box"})
_EPS = 1e-6


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class SampleSettings:
    """Every knob of a sampling run (recorded in each sidecar)."""

    cfg: float = 3.0  # text classifier-free guidance (1 = off)
    control_cfg: float = 1.0  # control guidance (1 = control in both CFG halves, CAR's convention)
    tau: float = 1.0  # temperature
    top_k: int = 0  # 0 = off
    top_p: float = 0.97  # 0 = off
    seed: int = 0
    batch_size: int = 1
    pn: str | None = "0.06M"  # pixel-count preset (BSQ models); VQ models use the VAE's patch numbers
    h_div_w: float = 1.0  # aspect for layouts that do not give one
    use_control: bool = True  # False: the base model (the control is ignored)
    font: str | None = None  # glyph font for layouts (None: the default control font)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    cfg_insertion_layer: int = 0  # 0: guidance on the logits
    # Explicit (h, w) grids of a custom schedule (schedule.scales, e.g. demo64x128); replace the pn template.
    scales: list[list[int]] | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.cfg >= 0, "cfg must be >= 0"),
            (self.control_cfg >= 0, "control_cfg must be >= 0"),
            (self.tau > 0, "tau must be > 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0.0 <= self.top_p < 1.0 or self.top_p == 1.0, "top_p must be in [0, 1]"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.pn is None or self.pn in PN_NUM_SCALES, f"pn must be one of {sorted(PN_NUM_SCALES)}"),
            (self.h_div_w > 0 and math.isfinite(self.h_div_w), "h_div_w must be a positive number"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self.as_dict()}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> SampleSettings:
        """Settings from a mapping (e.g. the ``sampling`` config group) plus overrides; unknown keys are an error."""
        merged = {**dict(values or {}), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}; known: {sorted(known)}")
        return cls(**merged)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of every setting."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- layouts


@dataclass
class Layout:
    """The words of one image and their polygons (pixels of ``size``, or of the output image when None)."""

    words: list[str]
    polygons: list[list[list[float]]]
    prompt: str | None = None
    h_div_w: float | None = None
    pn: str | None = None
    font: str | None = None
    size: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "layout") -> Layout:
        """Parse one image entry of a layout file (see the module docstring); errors name ``where``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping with 'texts' (or 'words' + 'polygons'), got {data!r}")
        unknown = sorted(set(data) - LAYOUT_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(LAYOUT_KEYS)}")
        words: list[str] = []
        polygons: list[list[list[float]]] = []
        if "texts" in data:
            if any(k in data for k in ("words", "polygons", "boxes")):
                raise ValueError(f"{where}: give either 'texts' or 'words' + 'polygons'/'boxes', not both")
            for j, entry in enumerate(data["texts"] or []):
                here = f"{where}, texts[{j}]"
                if not isinstance(entry, Mapping):
                    raise ValueError(f"{here}: expected a mapping with 'text' and 'polygon' or 'box', got {entry!r}")
                bad = sorted(set(entry) - TEXT_KEYS)
                if bad:
                    raise ValueError(f"{here}: unknown keys {bad}; known: {sorted(TEXT_KEYS)}")
                if ("text" in entry) == ("word" in entry):
                    raise ValueError(f"{here}: give exactly one of 'text' or 'word'")
                if ("polygon" in entry) == ("box" in entry):
                    raise ValueError(f"{here}: give exactly one of 'polygon' or 'box'")
                words.append(_as_word(entry.get("text", entry.get("word"))))
                polygons.append(_box_polygon(entry["box"], here) if "box" in entry else entry["polygon"])
        else:
            words = [_as_word(w) for w in data.get("words") or []]
            if ("polygons" in data) == ("boxes" in data):
                raise ValueError(f"{where}: give 'texts', or 'words' with exactly one of 'polygons' or 'boxes'")
            if "boxes" in data:
                polygons = [_box_polygon(b, f"{where}, boxes[{j}]") for j, b in enumerate(data["boxes"] or [])]
            else:
                polygons = list(data["polygons"] or [])
            if len(words) != len(polygons):
                raise ValueError(f"{where}: {len(words)} words but {len(polygons)} polygons/boxes")
        aspect = data.get("aspect", data.get("h_div_w"))
        size = data.get("size")
        if size is not None:
            if not (isinstance(size, Sequence) and len(size) == 2 and all(_is_number(v) and v > 0 for v in size)):
                raise ValueError(f"{where}: size must be [H, W] with positive numbers, got {size!r}")
            size = (int(size[0]), int(size[1]))
        if aspect is not None and not (_is_number(aspect) and aspect > 0):
            raise ValueError(f"{where}: aspect (h/w) must be a positive number, got {aspect!r}")
        pn = data.get("pn")
        if pn is not None and pn not in PN_NUM_SCALES:
            raise ValueError(f"{where}: pn must be one of {sorted(PN_NUM_SCALES)}, got {pn!r}")
        prompt = data.get("prompt", data.get("caption"))
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}: prompt must be a string, got {prompt!r}")
        font = data.get("font")
        return cls(
            words=words,
            polygons=[_polygon_list(p, f"{where}, text {j}") for j, p in enumerate(polygons)],
            prompt=prompt,
            h_div_w=float(aspect) if aspect is not None else (size[0] / size[1] if size else None),
            pn=pn,
            font=str(font) if font is not None else None,
            size=size,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` reads back."""
        out: dict[str, Any] = {"texts": [{"text": w, "polygon": p} for w, p in zip(self.words, self.polygons)]}
        for key, value in (("prompt", self.prompt), ("aspect", self.h_div_w), ("pn", self.pn), ("font", self.font)):
            if value is not None:
                out[key] = value
        if self.size is not None:
            out["size"] = list(self.size)
        return out

    def default_prompt(self) -> str:
        """A caption in the synthetic data's style: ``a sign that says "A" and "B"``."""
        quoted = [f'"{w}"' for w in self.words]
        if not quoted:
            return "a sign"
        joined = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
        return f"a sign that says {joined}"

    def in_pixels(self, out_hw: tuple[int, int], where: str = "layout") -> Layout:
        """The layout validated and with its polygons in the pixels of an ``out_hw`` = (H, W) image."""
        h, w = out_hw
        frame = self.size or (h, w)
        if not self.words:
            raise ValueError(f"{where}: the layout has no texts (generate without a layout for text-free images)")
        sy, sx = h / frame[0], w / frame[1]
        polygons = []
        for j, (word, poly) in enumerate(zip(self.words, self.polygons)):
            here = f"{where}, text {j} ({word!r})"
            if not isinstance(word, str):
                raise ValueError(f"{here}: the word must be a string, got {type(word).__name__}")
            if not word.strip():
                raise ValueError(f"{here}: the word is empty")
            pts = np.asarray(poly, dtype=np.float64)
            for x, y in pts:
                if not (-_EPS <= x <= frame[1] + _EPS and -_EPS <= y <= frame[0] + _EPS):
                    raise ValueError(
                        f"{here}: polygon point ({x:g}, {y:g}) lies outside the {frame[1]}x{frame[0]} (WxH) image"
                    )
            scaled = pts * [sx, sy]
            x, y = scaled[:, 0], scaled[:, 1]
            area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))
            if area < 1.0:
                raise ValueError(f"{here}: the polygon is degenerate (area {area:.2f} px^2 in the output image)")
            polygons.append(scaled.tolist())
        return dataclasses.replace(self, polygons=polygons, size=(h, w))


def _as_word(value: Any) -> Any:
    """YAML reads ``text: 2024`` as a number: such words are meant as their digits."""
    return str(value) if _is_number(value) else value


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _box_polygon(box: Any, where: str) -> list[list[float]]:
    """[x0, y0, x1, y1] -> the TL, TR, BR, BL polygon."""
    if not (isinstance(box, Sequence) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise ValueError(f"{where}: a box must be [x0, y0, x1, y1] numbers, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: a box needs x1 > x0 and y1 > y0, got {list(box)}")
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _polygon_list(poly: Any, where: str) -> list[list[float]]:
    """A validated list of >= 3 finite [x, y] points."""
    try:
        arr = np.asarray(poly, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a polygon must be a list of [x, y] points, got {poly!r}") from None
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3:
        raise ValueError(f"{where}: a polygon must be >= 3 [x, y] points, got {poly!r}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: the polygon has non-finite coordinates: {poly!r}")
    return arr.tolist()


def read_layouts(source: str | os.PathLike | Sequence[Any] | Mapping[str, Any]) -> list[Layout]:
    """Layouts from a YAML/JSON file or already-parsed data: a list, ``{"images": [...]}`` or one image."""
    where = "layout"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"layout file not found: {path}")
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML/JSON: {e}") from e
        where = str(path)
    else:
        data = source
    if isinstance(data, Layout):
        return [data]
    if isinstance(data, Mapping) and "images" in data:
        data = data["images"]
    elif isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, Sequence) or isinstance(data, str) or not data:
        raise ValueError(f"{where}: expected a non-empty list of images (or {{'images': [...]}}), got {data!r}")
    return [d if isinstance(d, Layout) else Layout.from_dict(d, f"{where}, image {i}") for i, d in enumerate(data)]


def render_layout_mask(layout: Layout, out_hw: tuple[int, int], font: str | None = None) -> np.ndarray:
    """The layout's glyph control as an (H, W) bool mask (coverage > 0.5, as the training masks)."""
    from .data.glyph import GlyphRenderer, resolve_font

    chosen = layout.font or font
    try:
        spec = resolve_font(chosen)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ValueError(f"unknown font {chosen!r}: {e}") from e
    image, missing = GlyphRenderer(spec).render_with_missing(layout.words, layout.polygons, out_hw)
    if missing:
        logger.warning("the glyph font %s cannot draw %s: they appear as .notdef boxes", spec.name, missing)
    return np.asarray(image) > 127.5


# ---------------------------------------------------------------------------------------------- controls


def schedule_for(
    model: nn.Module, vae: nn.Module, h_div_w: float, pn: str | None, scales: Sequence[Sequence[int]] | None = None
) -> list[tuple[int, int, int]]:
    """The scale schedule: explicit ``scales`` (a custom schedule), else the official template nearest
    ``h_div_w`` at ``pn`` (BSQ), or VAR's (VQ, square)."""
    if scales:
        return normalize_schedule(scales)
    if getattr(model, "bitwise", True):
        if pn is None:
            raise ValueError("a bitwise (BSQ) model needs a pn preset (sampling.pn / schedule.pn)")
        return get_schedule(h_div_w, pn)
    patch_nums = getattr(vae, "patch_nums", None)
    if patch_nums is None:
        raise ValueError("an index-head (VQ) model samples with its VQ-VAE's patch numbers: pass the VQ-VAE")
    return normalize_schedule([(1, p, p) for p in patch_nums])


def image_stride(model: nn.Module, vae: nn.Module) -> int:
    """Pixels per token of the last scale: the tokenizer's patch, x2 with Infinity's 2x2 spatial patchify."""
    patch = int(getattr(vae, "downsample", 16))
    return patch * (2 if getattr(model, "apply_spatial_patchify", False) else 1)


def mask_conditions_for(conditions: Sequence[str], mask_conditions: Sequence[str] | None) -> list[str]:
    """The mask-type conditions (binary, thresholded); default: glyph."""
    return [c for c in conditions if c in (mask_conditions if mask_conditions is not None else ("glyph",))]


def layout_control(
    layout: Layout, out_hw: tuple[int, int], conditions: Sequence[str], masks: Sequence[str], font: str | None
) -> Tensor:
    """(Cc, H, W) control in [-1, 1] from a layout (the model's conditions must be glyph only)."""
    if list(conditions) != ["glyph"]:
        raise ValueError(
            f"layouts make glyph controls only, but the model is conditioned on {list(conditions)}: "
            "pass control_images with every condition instead"
        )
    from .data.transforms import mask_to_tensor, rgb_to_tensor

    mask = render_layout_mask(layout, out_hw, font)
    if "glyph" in masks:
        return mask_to_tensor([mask])[0]
    return rgb_to_tensor([np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)])[0]


def _load_control_image(item: Any, name: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    if isinstance(item, str | os.PathLike):
        from .data.glyph import load_condition

        if not Path(item).is_file():
            raise FileNotFoundError(f"control image for {name!r} not found: {item}")
        return load_condition(item)
    raise ValueError(f"a {name!r} control must be a path, a PIL image or an array, got {type(item).__name__}")


def control_from_images(
    item: Any,
    conditions: Sequence[str],
    masks: Sequence[str],
    pn: str | None,
    model: nn.Module,
    vae: nn.Module,
    scales: Sequence[Sequence[int]] | None = None,
) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """(Cc, H, W) control and its schedule from one control entry.

    ``item``: a (Cc, H, W) tensor in [-1, 1]; an image (path / PIL / array) for a single-condition model;
    or a mapping ``{condition: image}``. Images are resized-to-cover and centre-cropped to the template
    nearest their aspect, masks thresholded at 0.5, exactly like training data.
    """
    from .data import transforms as T

    if isinstance(item, Tensor):
        if item.dim() != 3 or item.shape[0] != 3 * len(conditions):
            raise ValueError(
                f"a control tensor must be (Cc={3 * len(conditions)}, H, W) for conditions {list(conditions)}, "
                f"got {tuple(item.shape)}"
            )
        h, w = item.shape[-2:]
        sched = schedule_for(model, vae, h / w, pn, scales)
        size = pixel_size(sched, image_stride(model, vae))
        if size != (h, w):
            raise ValueError(f"a control tensor of {h}x{w} does not fit the schedule's {size} image")
        return item.float(), sched
    if isinstance(item, Mapping):
        missing = [c for c in conditions if c not in item]
        extra = [c for c in item if c not in conditions]
        if missing or extra:
            raise ValueError(f"control images must give exactly the conditions {list(conditions)}: "
                             f"missing {missing}, unexpected {extra}")  # fmt: skip
        images = {c: _load_control_image(item[c], c) for c in conditions}
    else:
        if len(conditions) != 1:
            raise ValueError(f"the model has conditions {list(conditions)}: give a mapping {{condition: image}} each")
        images = {conditions[0]: _load_control_image(item, conditions[0])}
    first = images[conditions[0]]
    sched = schedule_for(model, vae, first.size[1] / first.size[0], pn, scales)
    out_hw = pixel_size(sched, image_stride(model, vae))
    parts = []
    for c in conditions:
        img = images[c]
        box = T.cover_crop_box((img.size[1], img.size[0]), out_hw)
        if c in masks:
            parts.append(T.mask_to_tensor([T.resize_mask(img, box, out_hw)])[0])
        else:
            parts.append(T.rgb_to_tensor([T.resize_rgb(img.convert("RGB"), box, out_hw, smooth=False)])[0])
    return torch.cat(parts, 0), sched


# ---------------------------------------------------------------------------------------------- sampling


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA for ``auto``/``bf16``; nothing on CPU unless ``bf16`` is asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


@torch.no_grad()
def sample_batch(
    model: nn.Module,
    vae: nn.Module,
    text,
    schedule: Sequence[Sequence[int]],
    controls: Tensor | None,
    seed: int,
    settings: SampleSettings,
    gt_labels: Sequence[Tensor] | None = None,
) -> Tensor:
    """One sampling call: (B, 3, H, W) float images in [-1, 1] on the CPU; ``controls`` None = the base model.

    ``gt_labels`` (the first k scales' labels, :attr:`~scenetxtvar.codes.ScaleTargets.per_scale` layout) are
    taken instead of sampled; the scales after them are sampled as usual.
    """
    from .models.pilot import build_control_pyramid

    device = model_device(model)
    b = text.batch_size
    kwargs: dict[str, Any] = dict(
        vae=vae,
        scale_schedule=normalize_schedule(schedule),
        label_B_or_BLT=text.to(device),
        B=b,
        g_seed=int(seed),
        cfg_list=settings.cfg,
        tau_list=settings.tau,
        top_k=settings.top_k,
        top_p=settings.top_p,
        cfg_insertion_layer=settings.cfg_insertion_layer,
    )
    if gt_labels:
        kwargs.update(gt_leak=len(gt_labels), gt_ls_Bl=[t.to(device) for t in gt_labels])
    if controls is not None and settings.use_control:
        if controls.shape[0] != b:
            raise ValueError(f"{controls.shape[0]} controls for {b} prompts")
        kwargs["control_tensors"] = build_control_pyramid(
            controls.to(device).float(), kwargs["scale_schedule"], patch=model.control_patch
        )
        kwargs["control_cfg"] = settings.control_cfg
    was_training = model.training
    model.eval()
    try:
        with autocast_for(device, settings.precision):
            out = model.autoregressive_infer_cfg(**kwargs)
    finally:
        model.train(was_training)
    if out.image is None:
        raise RuntimeError("the sampler returned no image: pass the tokenizer as vae")
    return out.image.float().clamp(-1, 1).cpu()


def to_pil(image: Tensor) -> Image.Image:
    """A (C, H, W) tensor in [-1, 1] as an RGB PIL image (first 3 channels; 1 channel repeated)."""
    from .training.panels import to_uint8

    return Image.fromarray(to_uint8(image))


@dataclass
class Generation:
    """What :func:`generate` returns: the images and, per image, its control and sampling record."""

    images: list[Image.Image]
    controls: list[Tensor | None]  # (Cc, H, W) in [-1, 1], None without a control
    records: list[dict[str, Any]] = field(default_factory=list)  # prompt, seed, schedule, layout, ...

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        return iter(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        return self.images[i]


def generate(
    model: nn.Module,
    vae: nn.Module,
    prompts: str | Sequence[str] | None,
    layouts: str | os.PathLike | Sequence[Layout | Mapping[str, Any]] | None = None,
    control_images: Sequence[Any] | None = None,
    *,
    text_encoder: Any,
    settings: SampleSettings | Mapping[str, Any] | None = None,
    conditions: Sequence[str] | None = None,
    mask_conditions: Sequence[str] | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Generation:
    """Sample one image per prompt, steered by a layout (glyph control) or control images, or by nothing.

    ``prompts`` may be None with layouts (each layout's prompt, or one made from its words) or a single
    prompt for every layout / control. ``settings`` and keyword ``overrides`` are :class:`SampleSettings`
    fields (cfg, control_cfg, tau, top_k, top_p, seed, batch_size, pn, h_div_w, use_control, font, ...).
    ``conditions`` default to the model's own; ``mask_conditions`` to glyph.
    """
    base = settings.as_dict() if isinstance(settings, SampleSettings) else dict(settings or {})
    settings = SampleSettings.from_mapping(base, **overrides)
    if layouts is not None and control_images is not None:
        raise ValueError("give layouts or control_images, not both")
    conditions = list(conditions if conditions is not None else getattr(model, "condition_names", ["glyph"]))
    masks = mask_conditions_for(conditions, mask_conditions)
    layout_list = read_layouts(layouts) if layouts is not None else None
    n_inputs = len(layout_list) if layout_list is not None else len(control_images) if control_images is not None else 0
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if n_inputs:
        if len(prompt_list) == 1:
            prompt_list = prompt_list * n_inputs
        elif not prompt_list and layout_list is not None:
            prompt_list = [lay.prompt or lay.default_prompt() for lay in layout_list]
        elif len(prompt_list) != n_inputs:
            raise ValueError(f"{len(prompt_list)} prompts for {n_inputs} layouts/control images (give 1 or {n_inputs})")
    if not prompt_list:
        raise ValueError("no prompts given")
    bad = [i for i, p in enumerate(prompt_list) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; entries {bad} are not")

    items = []  # (prompt, schedule, control or None, record)
    for i, prompt in enumerate(prompt_list):
        record: dict[str, Any] = {"index": i, "prompt": prompt, "layout": None, "control": None}
        control = None
        if layout_list is not None:
            lay = layout_list[i]
            if lay.prompt is not None and prompts is not None and lay.prompt != prompt:
                logger.info("image %d: the given prompt replaces the layout's prompt %r", i, lay.prompt)
            sched = schedule_for(model, vae, lay.h_div_w or settings.h_div_w, lay.pn or settings.pn, settings.scales)
            size = pixel_size(sched, image_stride(model, vae))
            scaled = lay.in_pixels(size, f"layout image {i}")
            control = layout_control(scaled, size, conditions, masks, settings.font)
            record["layout"] = scaled.to_dict()
            record["control"] = "layout"
        elif control_images is not None:
            entry = control_images[i]
            control, sched = control_from_images(entry, conditions, masks, settings.pn, model, vae, settings.scales)
            record["control"] = _describe_control(entry)
        else:
            sched = schedule_for(model, vae, settings.h_div_w, settings.pn, settings.scales)
        items.append((prompt, sched, control, record))

    from tqdm.auto import tqdm

    batches: list[list[int]] = []
    for i, (_, sched, _, _) in enumerate(items):
        if batches and len(batches[-1]) < settings.batch_size and items[batches[-1][0]][1] == sched:
            batches[-1].append(i)
        else:
            batches.append([i])
    device = model_device(model)
    if isinstance(text_encoder, nn.Module):
        text_encoder.to(device)
    images: list[Image.Image | None] = [None] * len(items)
    start = time.perf_counter()
    for batch in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        sched = items[batch[0]][1]
        seed = settings.seed + batch[0]
        text = text_encoder.encode([items[i][0] for i in batch])
        ctrls = [items[i][2] for i in batch]
        stacked = torch.stack(ctrls) if all(c is not None for c in ctrls) else None
        out = sample_batch(model, vae, text, sched, stacked, seed, settings)
        for pos, i in enumerate(batch):
            images[i] = to_pil(out[pos])
            items[i][3].update(
                seed=seed,
                batch_size=len(batch),
                batch_position=pos,
                schedule=[list(s) for s in sched],
                size=list(pixel_size(sched, image_stride(model, vae))),
                controlled=stacked is not None and settings.use_control,
            )
    logger.info("sampled %d images in %.1f s", len(items), time.perf_counter() - start)
    return Generation(images=images, controls=[it[2] for it in items], records=[it[3] for it in items])


def _describe_control(entry: Any) -> Any:
    """How a control entry is recorded in a sidecar (paths as strings, in-memory images by kind)."""
    if isinstance(entry, Mapping):
        return {k: _describe_control(v) for k, v in entry.items()}
    if isinstance(entry, str | os.PathLike):
        return str(entry)
    return type(entry).__name__


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class CheckpointInfo:
    """What was loaded: the path, its kind (export / lightning / weights), the file hashed and its SHA-256."""

    path: str
    kind: str
    file: str
    sha256: str
    car_config: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


class SamplingKit(NamedTuple):
    """``load_model_and_vae``'s result: unpack ``vae, model, text_encoder, *_``."""

    vae: nn.Module
    model: nn.Module
    text_encoder: Any
    module: Any  # the PilotModule (compute_loss for teacher-forced metrics)
    checkpoint: CheckpointInfo | None
    conditions: list[str]
    mask_conditions: list[str]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _container(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def resolve_spec(cfg_or_paths: Any) -> dict[str, Any]:
    """Normalise what ``load_model_and_vae`` accepts into model/vae/text/conditions/masks/ckpt/device."""
    if isinstance(cfg_or_paths, str | os.PathLike):
        path = Path(cfg_or_paths)
        if path.is_file() and path.suffix == ".ckpt":
            hp = read_checkpoint(path, "Lightning checkpoint").get("hyper_parameters")
            if not isinstance(hp, Mapping) or not {"model", "vae", "text"} <= set(hp):
                raise ValueError(f"{path} has no PilotModule hyper_parameters: pass a config instead")
            return {
                "model": dict(hp["model"]),
                "vae": dict(hp["vae"]),
                "text": dict(hp["text"]),
                "conditions": list(hp.get("conditions", ["glyph"])),
                "mask_conditions": None,
                "schedule": hp.get("schedule"),
                "ckpt": str(path),
                "device": "auto",
            }
        # An export directory does not record the VAE and text encoder: compose the default sample config.
        from hydra import compose, initialize_config_dir

        conf = Path(__file__).resolve().parents[1] / "conf"
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("sample", overrides=[f"ckpt={path}"])
        return resolve_spec(cfg)
    if not isinstance(cfg_or_paths, Mapping):
        raise ValueError(f"load_model_and_vae takes a config, a mapping or a checkpoint path, got {cfg_or_paths!r}")
    m = cfg_or_paths
    if "condition" in m:  # a Hydra config (sample / evaluate / train)
        from omegaconf import DictConfig, OmegaConf

        if isinstance(m, DictConfig) and OmegaConf.is_missing(m, "ckpt"):
            raise ValueError(
                "ckpt is required: ckpt=<CAR export dir or Lightning .ckpt> (ckpt=null samples an untrained branch)"
            )

        sel = OmegaConf.select if not isinstance(m, dict) else (lambda c, k, default=None: _dict_select(c, k, default))
        return {
            "model": _container(sel(m, "model.build")),
            "vae": _container(sel(m, "vae.build")),
            "text": _container(sel(m, "text")),
            "conditions": list(_container(sel(m, "condition.names"))),
            "mask_conditions": _container(sel(m, "condition.masks", default=None)),
            # Explicit scales of a custom schedule (schedule=demo64x128); templates otherwise.
            "schedule": _container(sel(m, "schedule.scales", default=None)),
            "ckpt": _container(sel(m, "ckpt", default=None)),
            "device": _container(sel(m, "device", default="auto")) or "auto",
        }
    missing = [k for k in ("model", "vae", "text") if k not in m]
    if missing:
        raise ValueError(f"the mapping lacks {missing}: give model, vae and text build settings (and ckpt, conditions)")
    return {
        "model": dict(_container(m["model"])),
        "vae": dict(_container(m["vae"])),
        "text": dict(_container(m["text"])),
        "conditions": list(_container(m.get("conditions", ["glyph"]))),
        "mask_conditions": _container(m.get("mask_conditions")),
        "schedule": _container(m.get("schedule")),
        "ckpt": m.get("ckpt"),
        "device": m.get("device", "auto") or "auto",
    }


def _dict_select(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Fields of car_config() and the override that sets each.
_CAR_FIELDS = {
    "car_depth": "model.build.car_depth",
    "fusion": "model.build.fusion",
    "conditioning_channels": "condition=...",
    "condition_names": "condition=...",
    "control_channels": "model.build.control_channels",
    "control_unshuffle": "model.build.control_unshuffle",
    "token_conv_kernel": "model.build.token_conv_kernel",
}


def check_car_config(saved: Mapping[str, Any], model: nn.Module, what: str) -> None:
    """ValueError naming every CAR setting where the checkpoint and the configured model differ."""
    mine = model.car_config()
    diffs = []
    for key, override in _CAR_FIELDS.items():
        if key in saved and _norm(saved[key]) != _norm(mine.get(key)):
            diffs.append(f"{key}: checkpoint {saved[key]!r}, configured {mine.get(key)!r} (set {override})")
    base = saved.get("base")
    if isinstance(base, Mapping):
        from .models.pilot import is_car_key

        have = detect_infinity_config({k: v for k, v in model.state_dict().items() if not is_car_key(k)})
        for key in ("depth", "embed_dim", "num_heads", "ffn_hidden", "text_channels", "codebook_dim", "vocab_size"):
            if key in base and key in have and base[key] != have[key]:
                diffs.append(f"base {key}: checkpoint {base[key]!r}, configured {have[key]!r} (choose model=...)")
    if diffs:
        raise ValueError(f"{what} does not match the configured model:\n  " + "\n  ".join(diffs))


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def load_checkpoint(model: nn.Module, ckpt: str | os.PathLike) -> CheckpointInfo:
    """Load a CAR export directory, a Lightning ``.ckpt`` or a CAR weights file into ``model``, strictly,
    after checking its recorded CAR settings and base against the configured model."""
    from .checkpoint import load_car_weights

    path = Path(os.path.expanduser(str(ckpt)))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}\n  set it with ckpt=/path/to/export_dir_or.ckpt")
    car_config = None
    if path.is_dir():
        kind = "export"
        candidates = [path / f"{CAR_WEIGHTS}.safetensors", path / f"{CAR_WEIGHTS}.pth"]
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} is not a CAR export: it has no {CAR_WEIGHTS}.safetensors or .pth")
        if (path / CAR_CONFIG).is_file():
            car_config = json.loads((path / CAR_CONFIG).read_text())
            check_car_config(car_config, model, f"the CAR export {path}")
        load_car_weights(model, weights)
    elif path.suffix == ".ckpt":
        kind, weights = "lightning", path
        obj = read_checkpoint(path, "Lightning checkpoint")
        info = obj.get("scenetxtvar") or {}
        car_config = info.get("car_config")
        if car_config:
            check_car_config(car_config, model, f"the Lightning checkpoint {path}")
        saved = info.get("base_fingerprint")
        if saved is not None:
            from .training.module import base_fingerprint

            mine = base_fingerprint(model)
            if saved.shape != mine.shape or not torch.allclose(saved.double(), mine, rtol=1e-9, atol=1e-6):
                raise ValueError(
                    f"the Lightning checkpoint {path} was trained on different base weights than the configured "
                    "model (model.base_weights, or the seed of a random demo base: seed=...)"
                )
        load_car_weights(model, obj)
    else:
        kind, weights = "weights", path
        load_car_weights(model, path)
    info = CheckpointInfo(str(path), kind, str(weights), sha256_file(weights), car_config)
    logger.info("loaded CAR weights from %s (%s, sha256 %s)", path, kind, info.sha256[:12])
    return info


def load_module(cfg_or_paths: Any, device: str | torch.device | None = None):
    """Build the configured PilotModule (frozen base, VAE, text encoder), load the checkpoint, eval mode.

    Returns ``(module, spec, checkpoint_info)``.
    """
    from .training.module import PilotModule

    spec = resolve_spec(cfg_or_paths)
    if spec["ckpt"] and not Path(os.path.expanduser(str(spec["ckpt"]))).exists():  # fail before building anything
        raise FileNotFoundError(f"checkpoint not found: {spec['ckpt']}\n  set it with ckpt=/path/to/export_dir_or.ckpt")
    module = PilotModule(
        model=spec["model"],
        vae=spec["vae"],
        text=spec["text"],
        conditions=spec["conditions"],
        control_dropout=0.0,
        schedule=spec.get("schedule") or None,
    )
    info = None
    if spec["ckpt"]:
        info = load_checkpoint(module.model, spec["ckpt"])
    elif not spec["model"].get("car_weights"):
        logger.warning("no checkpoint (ckpt=null): the CAR branch is untrained")
    module.eval().requires_grad_(False)
    module.to(resolve_device(device if device is not None else spec["device"]))
    return module, spec, info


def load_model_and_vae(cfg_or_paths: Any, device: str | torch.device | None = None) -> SamplingKit:
    """Everything sampling needs, from a config (sample/evaluate/train), a mapping or a checkpoint path.

    - a Hydra config: ``model.build``, ``vae.build``, ``text``, ``condition`` and ``ckpt`` (export dir or .ckpt);
    - a mapping: ``{"model": build kwargs, "vae": ..., "text": ..., "conditions": [...], "ckpt": ...}``;
    - a ``.ckpt`` path: the architecture from its saved hyper-parameters;
    - an export directory: the default ``conf/sample.yaml`` groups (the tiny demo) with ``ckpt`` set.

    The checkpoint's CAR settings and base are checked against the configured model (a clear
    ``ValueError`` when they differ), then loaded strictly. Returns a :class:`SamplingKit`
    ``(vae, model, text_encoder, module, checkpoint, conditions, mask_conditions)``.
    """
    module, spec, info = load_module(cfg_or_paths, device)
    conditions = list(spec["conditions"])
    masks = mask_conditions_for(conditions, spec["mask_conditions"])
    return SamplingKit(module.vae, module.model, module.text_encoder, module, info, conditions, masks)


# ---------------------------------------------------------------------------------------------- outputs


def _fit_text(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_grid(controls: Sequence[Tensor | None], images: Sequence[Image.Image], captions: Sequence[str]) -> Image.Image:
    """Rows of (control | sample) tiles with the caption under each row; a missing control is a grey tile."""
    from PIL import ImageFont

    if not (len(controls) == len(images) == len(captions)) or not images:
        raise ValueError(f"make_grid needs as many controls, images and captions (>0), got "
                         f"{len(controls)}, {len(images)}, {len(captions)}")  # fmt: skip
    pad, title_h, caption_h = 4, 18, 16
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    width = 2 * w + 3 * pad
    row_h = h + caption_h + pad
    grid = Image.new("RGB", (width, title_h + len(images) * row_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, title in enumerate(("control", "sample")):
        draw.text((pad + c * (w + pad) + 2, 3), title, fill="black", font=font)
    for r, (ctrl, img, cap) in enumerate(zip(controls, images, captions)):
        y = title_h + r * row_h
        tile = to_pil(ctrl) if ctrl is not None else Image.new("RGB", img.size, (128, 128, 128))
        grid.paste(tile.resize(img.size) if tile.size != img.size else tile, (pad, y))
        grid.paste(img, (2 * pad + w, y))
        draw.text((pad + 2, y + h + 2), _fit_text(str(cap), draw, font, width - 2 * pad - 4), fill="black", font=font)
    return grid


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _cfg_list(value: Any) -> list[Any]:
    value = _container(value)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _shard_inputs(cfg: Any, kit: SamplingKit, limit: int | None) -> tuple[list[str], list[Tensor], list[Layout]]:
    """Prompts, controls and layouts (from the metadata) of eval shards."""
    from .evaluation.runner import eval_datamodule

    dm = eval_datamodule(cfg, batch_size=1, num_images=limit)
    prompts, controls, layouts = [], [], []
    for batch in dm.val_dataloader():
        for i in range(batch["images"].shape[0]):
            if not bool(batch["valid"][i]):
                continue
            meta = batch["meta"][i]
            prompts.append(batch["captions"][i])
            controls.append(batch["controls"][i])
            h, w = batch["images"].shape[-2:]
            layouts.append(Layout(list(meta.get("words") or []), meta.get("polygons") or [], size=(h, w)))
            if limit is not None and len(prompts) >= limit:
                return prompts, controls, layouts
    return prompts, controls, layouts


def run_sample(cfg: Any) -> dict[str, Any]:
    """sample.py: checkpoint + prompts and layouts / control images / eval shards -> PNGs, sidecars and a grid."""
    from omegaconf import OmegaConf

    run_dir = Path(OmegaConf.select(cfg, "paths.run_dir"))
    out_dir = run_dir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = SampleSettings.from_mapping(_container(cfg.sampling))
    sources = [k for k in ("layout", "control_images", "shards") if _container(cfg.get(k))]
    if len(sources) > 1:
        raise ValueError(f"give one of layout=, control_images= or shards=, got {sources}")
    kit = load_model_and_vae(cfg)
    prompts = _cfg_list(cfg.get("prompts"))
    num = cfg.get("num_images")
    layouts: list[Layout] | None = None
    controls: list[Any] | None = None
    shard_layouts: list[Layout] | None = None
    if cfg.get("layout"):
        layouts = read_layouts(str(cfg.layout))
    elif cfg.get("control_images"):
        controls = _cfg_list(cfg.control_images)
    elif cfg.get("shards"):
        shard_prompts, controls, shard_layouts = _shard_inputs(cfg, kit, num)
        prompts = prompts or shard_prompts
    n_inputs = len(layouts or controls or prompts)
    if n_inputs == 0:
        raise ValueError("nothing to sample: give prompts=[...], layout=FILE, control_images=[...] or shards=DIR")
    total = int(num) if num is not None else n_inputs
    if total < 1:
        raise ValueError(f"num_images must be >= 1, got {num}")

    def cycle(seq):
        return [seq[i % len(seq)] for i in range(total)] if seq else seq

    if len(prompts) > 1 and len(prompts) != n_inputs:
        raise ValueError(f"{len(prompts)} prompts for {n_inputs} inputs (give 1 or {n_inputs})")
    result = generate(
        kit.model,
        kit.vae,
        cycle(prompts) if len(prompts) > 1 or not (layouts or controls) else (prompts or None),
        layouts=cycle(layouts) if layouts else None,
        control_images=cycle(controls) if controls else None,
        text_encoder=kit.text_encoder,
        settings=settings,
        conditions=kit.conditions,
        mask_conditions=kit.mask_conditions,
        progress=bool(cfg.get("progress", True)),
    )
    ckpt = kit.checkpoint.as_dict() if kit.checkpoint else None
    model_info = {
        "preset": OmegaConf.select(cfg, "model.preset"),
        "car": kit.model.car_config(),
        "base_weights": OmegaConf.select(cfg, "model.build.base_weights"),
        "vae": OmegaConf.select(cfg, "vae.build.path"),
        "text": OmegaConf.select(cfg, "text.kind"),
        "seed": cfg.get("seed"),
    }
    files = []
    for i, (img, record) in enumerate(zip(result.images, result.records)):
        stem = f"{i:05d}"
        img.save(out_dir / f"{stem}.png")
        if shard_layouts is not None:
            record["layout"] = shard_layouts[i % len(shard_layouts)].to_dict()
            record["control"] = "shards"
        sidecar = {
            "image": f"{stem}.png",
            **record,
            "settings": settings.as_dict(),
            "checkpoint": ckpt,
            "model": model_info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(out_dir / f"{stem}.json", sidecar)
        files.append(str(out_dir / f"{stem}.png"))
    grid_path = None
    if cfg.get("grid", True):
        grid_path = run_dir / "grid.png"
        make_grid(result.controls, result.images, [r["prompt"] for r in result.records]).save(grid_path)
    logger.info("wrote %d samples to %s%s", len(files), out_dir, f" and the grid {grid_path}" if grid_path else "")
    return {"run_dir": str(run_dir), "samples": files, "grid": str(grid_path) if grid_path else None}
