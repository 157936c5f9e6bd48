"""How far the CAR branch has moved from its initialisation, and proof that the frozen base has not.

``ParameterChangeVisualizer`` is the notebook-friendly core (the name the research code's users know);
``ParameterDriftCallback`` runs it inside Lightning. Everything is computed from sums of squares of
*local* tensors, all-reduced over the shard groups of DTensor parameters, so it works unchanged under
FSDP2 (where ``wandb.watch`` crashes) and never gathers a full parameter.

Metric keys (``<group>`` is ``car_control_convs``, ``car_var_conv``, ``car_blocks.{i}``,
``car_skip_norm.{i}``, ``car_skip_linear.{i}``, or ``total`` for the whole branch):

* ``drift/rel/<group>`` = ||θ - θ0|| / ||θ0||, or ``drift/abs/<group>`` = ||θ - θ0|| for groups that start
  at zero (the residual-mode ``car_skip_linear``): their growth from zero is the branch switching on;
* ``norm/<group>`` = ||θ||, ``update/<group>`` = ||θ - θ_prev|| / ||θ||, ``grad/<group>`` = ||∇θ||;
* guards, all must stay 0: ``frozen/max_abs_change`` (largest change of the base's per-tensor checksums),
  ``frozen/params_with_grad`` (base parameters holding a gradient), ``trainable/params_without_grad``
  (trainable CAR parameters that got no gradient from the backward);
* ``fusion/j{j}/s{k}`` = mean ||fused - x|| / ||x|| of fusion j over the tokens of scale k, ``fusion/mean``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from ..models.pilot import is_car_key
from ..scales import normalize_schedule, scale_lengths, var_schedule
from .module import base_fingerprint

logger = logging.getLogger(__name__)

# Below this ||θ0|| a group counts as zero-initialised and reports absolute drift (as the research tool did).
ZERO_NORM = 1e-8
# Name fragments that wrappers (FSDP1, activation checkpointing, torch.compile) insert into parameter names.
_WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Columns of the per-parameter statistics: squared norms of θ - θ0, θ, ∇θ, θ - θ_prev.
_DRIFT, _NORM, _GRAD, _UPDATE = range(4)


def clean_name(name: str) -> str:
    """A parameter name without the fragments that wrappers insert."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def group_of(name: str) -> str:
    """The monitoring group of a CAR parameter: its top module, with the index for ModuleLists."""
    parts = clean_name(name).split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def unwrap_pilot(model: nn.Module) -> nn.Module:
    """The module whose own parameter names start with ``car_``: descends through ``.model``/wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if any(is_car_key(clean_name(n)) for n, _ in model.named_parameters()):
            return model
        for attr in ("model", "_orig_mod", "_checkpoint_wrapped_module", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
    return model


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (no communication), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(group: Any = None) -> torch.device:
    """Where a tensor must live for a collective on ``group`` (NCCL needs CUDA)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: Tensor, op: Any = None, group: Any = None) -> Tensor:
    """All-reduce ``t`` (returns a new tensor on ``t``'s device), moving it where the backend wants it."""
    dev = _comm_device(group)
    buf = t.to(dev, copy=True)
    dist.all_reduce(buf, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


_warned_partial = False


def _shard_groups(p: Tensor) -> tuple[Any, ...]:
    """The process groups over which a DTensor's local sums of squares must be summed (its Shard dims)."""
    global _warned_partial
    if not (hasattr(p, "device_mesh") and hasattr(p, "placements")) or not _is_dist():
        return ()
    groups = []
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            groups.append(p.device_mesh.get_group(dim))
        elif placement.is_partial() and not _warned_partial:
            # ||a + b||^2 != ||a||^2 + ||b||^2: a Partial tensor's norm is only approximated by this sum.
            logger.warning("parameter with a Partial placement: its drift norm is approximate")
            _warned_partial = True
    return tuple(groups)


@dataclass
class _Tracked:
    """One CAR parameter: where to find it, its group, and its local snapshots."""

    name: str
    group: int
    theta0: Tensor
    prev: Tensor | None


class ParameterChangeVisualizer:
    """Per-group drift of the CAR branch since construction, gradient/update norms and frozen-base guards.

    Build it once the model is on its device (and sharded, under FSDP2): θ0 is the local shard of every
    CAR parameter at that moment, kept on the parameter's device (``snapshot_device="cpu"`` offloads it).
    Every rank must call :meth:`stats` / :meth:`grad_stats` / :meth:`param_stats` together under
    torch.distributed, as they all-reduce.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str | Path | None = None,
        snapshot_device: str | torch.device | None = None,
        track_updates: bool = True,
    ) -> None:
        self.model = unwrap_pilot(model)
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.snapshot_device = torch.device(snapshot_device) if snapshot_device is not None else None
        self.history: dict[int, dict[str, float]] = {}
        self.groups: list[str] = []
        self._tracked: list[_Tracked] = []
        self._reduce_plan: dict[tuple[int, ...], tuple[tuple[Any, ...], list[int]]] = {}
        group_ids: dict[str, int] = {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                clean = clean_name(name)
                if not is_car_key(clean):
                    continue
                g = group_ids.setdefault(group_of(clean), len(group_ids))
                local = _local(p.detach())
                theta0 = local.to(self.snapshot_device or local.device, copy=True)
                prev = theta0.clone() if track_updates else None
                self._tracked.append(_Tracked(name, g, theta0, prev))
                pgs = _shard_groups(p)
                key = tuple(id(pg) for pg in pgs)
                self._reduce_plan.setdefault(key, (pgs, []))[1].append(len(self._tracked) - 1)
        if not self._tracked:
            raise ValueError(
                f"{type(self.model).__name__} has no car_*/control_* parameters to monitor: pass an InfinityPilot "
                "(or a module holding one as .model) built with init_car_modules=True"
            )
        self.groups = list(group_ids)
        self._group_index = torch.tensor([t.group for t in self._tracked])
        init_sq = self._group_sums(
            self._reduced([torch.linalg.vector_norm(t.theta0.float()) ** 2 for t in self._tracked])
        )
        self.init_norms = init_sq.sqrt().tolist()
        self._init_total = math.sqrt(float(init_sq.sum()))
        self.drift_kinds = ["abs" if n < ZERO_NORM else "rel" for n in self.init_norms]
        self._fingerprint0 = base_fingerprint(self.model)
        self._calls = 0

    # ------------------------------------------------------------------ reductions

    def _reduced(self, values: Sequence[Tensor]) -> Tensor:
        """Per-parameter local values (each scalar or row) summed over their shard groups: (P, ...) float64."""
        dev = values[0].device
        rows = torch.stack([v.to(dev, torch.float64) for v in values])
        for pgs, idx in self._reduce_plan.values():
            if not pgs:
                continue
            index = torch.tensor(idx, device=dev)
            sub = rows.index_select(0, index)
            for pg in pgs:  # Shard on several mesh dims: sum over each in turn
                sub = _all_reduce(sub, group=pg)
            rows.index_copy_(0, index, sub)
        return rows.cpu()

    def _group_sums(self, rows: Tensor) -> Tensor:
        """Sum per-parameter rows (P, ...) into per-group rows (G, ...)."""
        out = torch.zeros((len(self.groups), *rows.shape[1:]), dtype=rows.dtype)
        return out.index_add_(0, self._group_index, rows)

    def _guards(self, values: Sequence[float]) -> list[float]:
        """Guard values maxed over ranks, so rank zero sees a violation on any rank."""
        t = torch.tensor(list(values), dtype=torch.float64)
        if _is_dist():
            t = _all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def _params(self) -> list[tuple[_Tracked, nn.Parameter]]:
        # Looked up by name each time: FSDP2 and device moves may swap the Parameter objects.
        named = dict(self.model.named_parameters())
        return [(t, named[t.name]) for t in self._tracked]

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def _compute(self, params: bool, grads: bool) -> dict[str, float]:
        pairs = self._params()
        zero = torch.zeros((), device=_local(pairs[0][1]).device)
        rows = []
        for t, p in pairs:
            local = _local(p.detach())
            cols = [zero] * 4
            if params:
                theta = local.float()
                cols[_DRIFT] = torch.linalg.vector_norm(theta - t.theta0.to(local.device).float()) ** 2
                cols[_NORM] = torch.linalg.vector_norm(theta) ** 2
                if t.prev is not None:
                    cols[_UPDATE] = torch.linalg.vector_norm(theta - t.prev.to(local.device).float()) ** 2
            if grads and p.grad is not None:
                cols[_GRAD] = torch.linalg.vector_norm(_local(p.grad.detach()).float()) ** 2
            rows.append(torch.stack([c.to(local.device) for c in cols]))
        per_group = self._group_sums(self._reduced(rows))
        total = per_group.sum(0)
        out: dict[str, float] = {}
        names = [*self.groups, "total"]
        sq = torch.cat([per_group, total[None]]).clamp_min(0).sqrt().tolist()
        for i, g in enumerate(names):
            drift, norm, grad, update = sq[i]
            if params:
                if g == "total":
                    out["drift/rel/total"] = drift / self._init_total if self._init_total >= ZERO_NORM else drift
                elif self.drift_kinds[i] == "abs":
                    out[f"drift/abs/{g}"] = drift
                else:
                    out[f"drift/rel/{g}"] = drift / self.init_norms[i]
                out[f"norm/{g}"] = norm
                if self._tracked[0].prev is not None:
                    out[f"update/{g}"] = update / norm if norm > 0 else 0.0
            if grads:
                out[f"grad/{g}"] = grad
        guards: dict[str, float] = {}
        if params:
            fp = base_fingerprint(self.model)
            change = (fp - self._fingerprint0).abs().max().item() if fp.numel() else 0.0
            guards["frozen/max_abs_change"] = change if math.isfinite(change) else float("inf")
        if grads:
            guards["frozen/params_with_grad"] = float(
                sum(1 for n, p in self.model.named_parameters() if not is_car_key(clean_name(n)) and p.grad is not None)
            )
            guards["trainable/params_without_grad"] = float(
                sum(1 for _, p in pairs if p.requires_grad and p.grad is None)
            )
        out.update(zip(guards, self._guards(guards.values())))
        return out

    def has_grads(self) -> bool:
        """Whether any CAR parameter holds a gradient (i.e. we are between a backward and zero_grad)."""
        return any(p.grad is not None for _, p in self._params())

    def grad_stats(self) -> dict[str, float]:
        """``grad/<group>`` norms and the gradient guards; call after a backward, before zero_grad."""
        return self._compute(params=False, grads=True)

    def param_stats(self, step: int | None = None, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """Drift, norms, update ratios (since the last call or :meth:`mark`) and ``frozen/max_abs_change``.

        The result (with ``extra`` merged in) is recorded in :attr:`history` under ``step`` (default: a call
        counter), then the update reference moves to the current parameters.
        """
        out = {**dict(extra or {}), **self._compute(params=True, grads=False)}
        self.record(step, out)
        self.mark()
        return out

    def stats(self, step: int | None = None, grads: bool | None = None) -> dict[str, float]:
        """Everything at once: :meth:`param_stats` plus :meth:`grad_stats` (``grads=None``: when grads exist)."""
        if grads is None:
            grads = self.has_grads()
        out = self._compute(params=True, grads=grads)
        self.record(step, out)
        self.mark()
        return out

    def record(self, step: int | None, metrics: Mapping[str, float]) -> int:
        """Add ``metrics`` to the history entry of ``step`` (default: the next call number); returns the step."""
        if step is None:
            step = self._calls
        self._calls = max(self._calls, int(step)) + 1
        self.history.setdefault(int(step), {}).update({k: float(v) for k, v in metrics.items()})
        return int(step)

    @torch.no_grad()
    def mark(self) -> None:
        """Make the current parameters the reference of the next update ratio (e.g. right before a step)."""
        for t, p in self._params():
            if t.prev is not None:
                t.prev.copy_(_local(p.detach()))

    # ------------------------------------------------------------------ plot

    def save_plot(self, path: str | Path | None = None, log_y: bool = False) -> Path:
        """Write a PNG line chart of each group's drift over the recorded steps (relative and absolute panels)."""
        if path is None:
            if self.save_dir is None:
                raise ValueError("save_plot needs a path (or a save_dir given at construction)")
            path = self.save_dir / "drift.png"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_drift_history(self.history, log_y=log_y).save(path)
        return path


# ---------------------------------------------------------------------- drawing

# tab20-like: distinguishable colours for up to 20 groups, then they repeat.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
]  # fmt: skip


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _series(history: Mapping[int, Mapping[str, float]], prefix: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(history):
        for key, value in history[step].items():
            if key.startswith(prefix) and math.isfinite(value):
                out.setdefault(key[len(prefix) :], []).append((step, value))
    return out


def _draw_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, list[tuple[int, float]]],
    log_y: bool,
    font: ImageFont.ImageFont,
) -> None:
    """One line chart with axes, ticks and a legend inside ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    legend_w = 170
    left, right, top, bottom = x0 + 70, x1 - legend_w, y0 + 24, y1 - 28
    draw.text((x0 + 8, y0 + 4), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="black")

    def fy(v: float) -> float:
        return math.log10(max(v, 1e-12)) if log_y else v

    steps = [s for pts in series.values() for s, _ in pts]
    vals = [fy(v) for pts in series.values() for _, v in pts]
    s_min, s_max = min(steps), max(steps)
    v_min, v_max = min(vals), max(vals)
    if not log_y:
        v_min = min(v_min, 0.0)
    if v_max - v_min < 1e-12:
        v_max = v_min + (1.0 if v_min == 0 else abs(v_min) * 0.1)
    s_span = max(s_max - s_min, 1)

    def px(step: float, value: float) -> tuple[float, float]:
        x = left + (step - s_min) / s_span * (right - left) if s_max > s_min else (left + right) / 2
        y = bottom - (fy(value) - v_min) / (v_max - v_min) * (bottom - top)
        return x, y

    for i in range(5):  # y ticks
        v = v_min + (v_max - v_min) * i / 4
        y = bottom - (bottom - top) * i / 4
        draw.line((left - 4, y, left, y), fill="black")
        label = f"1e{v:.1f}" if log_y else f"{v:.3g}"
        draw.text((x0 + 4, y - 6), label, fill="black", font=font)
    for i in range(5):  # x ticks (steps)
        s = s_min + s_span * i / 4 if s_max > s_min else s_min
        x = left + (right - left) * i / 4 if s_max > s_min else (left + right) / 2
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 10, bottom + 6), f"{s:.0f}", fill="black", font=font)
        if s_max == s_min:
            break
    draw.text((right - 30, bottom + 14), "step", fill="black", font=font)
    for k, (name, pts) in enumerate(series.items()):
        colour = (0, 0, 0) if name == "total" else _PALETTE[k % len(_PALETTE)]
        xy = [px(s, v) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3 if name == "total" else 2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        ly = top + 14 * k
        draw.rectangle((right + 10, ly + 3, right + 22, ly + 11), fill=colour)
        draw.text((right + 26, ly), name, fill="black", font=font)


def plot_drift_history(history: Mapping[int, Mapping[str, float]], log_y: bool = False) -> Image.Image:
    """The drift chart as a PIL image: relative drift per group, and absolute drift of zero-init groups."""
    font = _font()
    panels = [
        (f"relative drift ||w - w0|| / ||w0||{' (log10)' if log_y else ''}", _series(history, "drift/rel/")),
        (
            f"absolute drift ||w - w0|| (zero-initialised groups){' (log10)' if log_y else ''}",
            _series(history, "drift/abs/"),
        ),
    ]
    panels = [(t, s) for t, s in panels if s]
    width = 960
    heights = [max(280, 14 * len(s) + 60) for _, s in panels] or [80]
    img = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(img)
    if not panels:
        draw.text((10, 30), "no drift recorded yet", fill="black", font=font)
        return img
    y = 0
    for (title, series), h in zip(panels, heights):
        _draw_panel(draw, (0, y, width, y + h), title, series, log_y, font)
        y += h
    return img


# ---------------------------------------------------------------------- fusion strength


def summarise_fusion_probe(
    probe: Iterable[tuple[int, Tensor]], scale_schedule: Sequence[Sequence[int]], valid: Tensor | None = None
) -> dict[str, float]:
    """``fusion/j{j}/s{k}`` means of a teacher-forced forward's probe, and the token-weighted ``fusion/mean``."""
    lengths = scale_lengths(scale_schedule)
    per_j: dict[int, list[Tensor]] = {}
    for j, ratio in probe:
        if ratio.shape[-1] != sum(lengths):
            raise ValueError(
                f"fusion probe of block {j} has {ratio.shape[-1]} tokens, the schedule {sum(lengths)}: "
                "summarise a teacher-forced forward over the whole schedule"
            )
        if valid is not None:
            ratio = ratio[valid.to(ratio.device).bool()]
        per_j.setdefault(int(j), []).append(ratio.float())
    out: dict[str, float] = {}
    total, count = 0.0, 0
    for j in sorted(per_j):
        ratio = torch.cat(per_j[j])
        for k, chunk in enumerate(ratio.split(lengths, dim=-1)):
            out[f"fusion/j{j}/s{k}"] = chunk.mean().item() if chunk.numel() else 0.0
        total += ratio.sum().item()
        count += ratio.numel()
    out["fusion/mean"] = total / count if count else 0.0
    return out


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (each measured on its own batch); identity without dist."""
    if not _is_dist() or not metrics:
        return metrics
    t = _all_reduce(torch.tensor(list(metrics.values()), dtype=torch.float64)) / dist.get_world_size()
    return dict(zip(metrics, t.tolist()))


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside, then every submodule's own train/eval flag restored (a frozen base may stay eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def fusion_strength(
    model: nn.Module,
    label_B_or_BLT: Any,
    x_BLC_wo_prefix: Tensor,
    scale_schedule: Sequence[Sequence[int]],
    control_tensors: Sequence[Tensor],
    valid: Tensor | None = None,
) -> dict[str, float]:
    """Per fused block j and scale k the mean ||fused - x|| / ||x|| of a no-grad, eval-mode forward."""
    model.fusion_probe = []
    try:
        with eval_mode(model):
            model(label_B_or_BLT, x_BLC_wo_prefix, scale_schedule, control_tensors=control_tensors)
        return summarise_fusion_probe(model.fusion_probe, scale_schedule, valid)
    finally:
        model.fusion_probe = None


def _batch_schedule(pl_module: Any, batch: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """The schedule ``PilotModule.compute_loss`` uses for ``batch``."""
    if getattr(pl_module, "is_vq", False):
        return normalize_schedule(var_schedule(batch["images"].shape[-1]))
    return pl_module.schedule_for(batch)


def trainer_forward_context(trainer: Any):
    """The trainer's autocast context (bf16-mixed etc.), or nothing outside a trainer."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return plugin.forward_context() if plugin is not None else nullcontext()


def fusion_strength_for_batch(pl_module: Any, batch: Mapping[str, Any], trainer: Any = None) -> dict[str, float]:
    """:func:`fusion_strength` of a ``PilotModule`` batch, via its own ``compute_loss`` (controls on, no noise)."""
    model = pl_module.model
    model.fusion_probe = []
    try:
        with torch.no_grad(), eval_mode(pl_module), trainer_forward_context(trainer):
            pl_module.compute_loss(batch, noise=False, drop_control=False)
        return summarise_fusion_probe(model.fusion_probe, _batch_schedule(pl_module, batch), batch.get("valid"))
    finally:
        model.fusion_probe = None


# ---------------------------------------------------------------------- Lightning callback


@rank_zero_only
def _log_metrics(loggers: Sequence[Any], metrics: Mapping[str, float], step: int) -> None:
    for lg in loggers:
        lg.log_metrics(dict(metrics), step=step)
    logger.debug("drift at step %d: %s", step, metrics)


@rank_zero_only
def _write_plot(visualizer: ParameterChangeVisualizer, path: Path) -> None:
    visualizer.save_plot(path)
    logger.info("drift chart written to %s", path)


class ParameterDriftCallback(L.Callback):
    """Logs :class:`ParameterChangeVisualizer` stats every ``every_n_steps`` optimizer steps (and the first).

    Gradient norms are taken in ``on_before_optimizer_step`` (after the backward, before clipping), drift,
    norms and the per-step update ratio after that step in ``on_train_batch_end``. Every
    ``fusion_every_n_steps`` the current batch is run once more (eval, no grad) to log the fusion strength.
    The drift chart goes to ``save_dir/drift.png`` (default ``<default_root_dir>/drift``) every
    ``plot_every_n_steps`` and at the end of training. ``strict=True`` raises when a frozen-base guard fires.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        plot_every_n_steps: int | None = None,
        save_dir: str | Path | None = None,
        fusion_every_n_steps: int | None = None,
        snapshot_device: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.plot_every_n_steps = plot_every_n_steps
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.fusion_every_n_steps = fusion_every_n_steps
        self.snapshot_device = snapshot_device
        self.strict = strict
        self.visualizer: ParameterChangeVisualizer | None = None
        self._pending: dict[str, float] | None = None
        self._last_fusion_step = -1

    def plot_path(self, trainer: Any) -> Path:
        """Where the drift chart goes."""
        base = self.save_dir if self.save_dir is not None else Path(trainer.default_root_dir) / "drift"
        return base / "drift.png"

    def _due(self, step: int) -> bool:
        return step == 1 or step % self.every_n_steps == 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Snapshot θ0: the model is on its device and sharded, and a resumed checkpoint is loaded by now.

        (``on_fit_start`` would be too early under FSDP2, which restores checkpoints after it.)
        """
        target = pl_module.model if isinstance(getattr(pl_module, "model", None), nn.Module) else pl_module
        self.visualizer = ParameterChangeVisualizer(target, self.save_dir, snapshot_device=self.snapshot_device)
        self._pending = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Gradient stats of the step about to be taken, and the reference for its update ratio."""
        if self.visualizer is None or not self._due(trainer.global_step + 1):
            return
        self._pending = self.visualizer.grad_stats()
        self.visualizer.mark()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After a monitored optimizer step: drift/update stats, fusion strength when due, log, plot."""
        if self.visualizer is None:
            return
        step = int(trainer.global_step)
        metrics: dict[str, float] = {}
        if self._pending is not None:
            metrics.update(self.visualizer.param_stats(step, extra=self._pending))
            self._pending = None
        every_fusion = self.fusion_every_n_steps
        if every_fusion and step > 0 and step % every_fusion == 0 and step != self._last_fusion_step:
            self._last_fusion_step = step
            fusion = _mean_over_ranks(fusion_strength_for_batch(pl_module, batch, trainer))
            self.visualizer.record(step, fusion)
            metrics.update(fusion)
        if not metrics:
            return
        _log_metrics(trainer.loggers, metrics, step)
        self._check(metrics, step)
        if self.plot_every_n_steps and step % self.plot_every_n_steps == 0:
            _write_plot(self.visualizer, self.plot_path(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the final drift chart."""
        if self.visualizer is not None and self.visualizer.history:
            _write_plot(self.visualizer, self.plot_path(trainer))

    def _check(self, metrics: Mapping[str, float], step: int) -> None:
        """Warn (or raise, if strict) when a guard fires; guard values are already maxed over ranks."""
        bad = {k: v for k, v in metrics.items() if k.startswith(("frozen/", "trainable/")) and v != 0}
        if not bad:
            return
        msg = (
            f"parameter guard fired at step {step}: {bad} (all must be 0: the frozen base unchanged and without "
            "grads, every trainable CAR parameter with a grad)"
        )
        if self.strict:
            raise RuntimeError(msg)
        logger.warning(msg)
