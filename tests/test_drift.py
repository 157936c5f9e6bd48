"""Parameter drift monitoring: per-group stats, frozen-base guards, fusion strength, chart, callback, FSDP2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from scenetxtvar.bitwise import BitwiseCodes
from scenetxtvar.models.pilot import InfinityPilot, build_control_pyramid, is_car_key
from scenetxtvar.scales import get_schedule
from scenetxtvar.training.drift import (
    ParameterChangeVisualizer,
    ParameterDriftCallback,
    fusion_strength,
    group_of,
    plot_drift_history,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(
    depth=4,
    embed_dim=64,
    num_heads=4,
    text_channels=128,
    text_maxlen=12,
    codebook_dim=8,
    block_chunks=2,
    cond_drop_rate=0.0,
    car_depth=2,
    control_channels=(8, 16, 32, 32, 32),
)
SCHEDULE = get_schedule(1.0, "0.06M")[:4]  # up to 6x6 tokens: 96x96 controls
GROUPS = [
    "car_control_convs",
    "car_var_conv",
    "car_blocks.0",
    "car_blocks.1",
    "car_skip_norm.0",
    "car_skip_norm.1",
    "car_skip_linear.0",
    "car_skip_linear.1",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pilot() -> InfinityPilot:
    torch.manual_seed(0)
    pilot = InfinityPilot(**SMALL)
    pilot.init_weights(aln=1.0, aln_gamma=1.0, head_scale=1.0, seed=1)  # an O(1) base so every block matters
    return pilot


def make_inputs(b: int = 2):
    """Packed text, teacher-forcing input, labels and the control pyramid of a toy batch."""
    g = torch.Generator().manual_seed(2)
    lens = [3 + i for i in range(b)]
    text = (torch.randn(sum(lens), 128, generator=g), lens, None, None)
    _, h, w = SCHEDULE[-1]
    targets = BitwiseCodes(8).targets(torch.randn(b, 8, h, w, generator=g), SCHEDULE)
    ctrl = build_control_pyramid(torch.rand(b, 3, 16 * h, 16 * w, generator=g) * 2 - 1, SCHEDULE, 16)
    return text, targets, ctrl


def loss_of(pilot: InfinityPilot, inputs) -> torch.Tensor:
    text, targets, ctrl = inputs
    logits = pilot(text, targets.x_BLC_wo_prefix, SCHEDULE, control_tensors=ctrl)
    return BitwiseCodes(8).loss_per_token(logits, targets.labels).mean()


def optimizer_for(pilot: InfinityPilot) -> torch.optim.Optimizer:
    return torch.optim.AdamW(pilot.car_parameters(), lr=1e-2)


def train(pilot, opt, inputs, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(pilot, inputs).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def base_param(pilot: InfinityPilot) -> nn.Parameter:
    return next(p for n, p in pilot.named_parameters() if not is_car_key(n) and p.ndim >= 2)


def test_groups_and_initial_stats_use_absolute_drift_for_zero_init_fusion():
    pilot = make_pilot()
    assert group_of("car_blocks.1.sa.mat_qkv.weight") == "car_blocks.1"
    assert group_of("car_control_convs.blocks.0.weight") == "car_control_convs"
    assert group_of("car_blocks._checkpoint_wrapped_module.0.ffn.fc1.weight") == "car_blocks.0"
    vis = ParameterChangeVisualizer(pilot)
    assert vis.groups == GROUPS
    s = vis.stats()
    assert not vis.has_grads() and not any(k.startswith("grad/") for k in s)  # no backward yet
    for g in GROUPS:
        kind = "abs" if g.startswith("car_skip_linear") else "rel"
        other = "rel" if kind == "abs" else "abs"
        assert s[f"drift/{kind}/{g}"] == 0.0 and f"drift/{other}/{g}" not in s
        assert f"norm/{g}" in s and s[f"update/{g}"] == 0.0
    assert s["norm/car_skip_linear.0"] == 0.0 and s["norm/car_blocks.0"] > 0
    assert s["frozen/max_abs_change"] == 0.0 and s["drift/rel/total"] == 0.0
    assert list(vis.history) == [0]


def test_training_steps_move_the_branch_and_keep_the_base_guards_at_zero():
    pilot = make_pilot()
    inputs = make_inputs()
    opt = optimizer_for(pilot)
    vis = ParameterChangeVisualizer(pilot)
    train(pilot, opt, inputs, 2)  # after one step the fusion is non-zero and every group gets gradient
    vis.mark()
    loss_of(pilot, inputs).backward()
    g = vis.grad_stats()
    assert g["frozen/params_with_grad"] == 0 and g["trainable/params_without_grad"] == 0
    assert all(g[f"grad/{name}"] > 0 for name in GROUPS) and g["grad/total"] > 0
    assert not any(k.startswith(("drift/", "norm/", "update/")) for k in g)
    opt.step()
    s = vis.param_stats(step=3, extra=g)
    assert s["frozen/max_abs_change"] == 0.0
    for name in GROUPS:
        assert s[f"update/{name}"] > 0
        key = f"drift/abs/{name}" if name.startswith("car_skip_linear") else f"drift/rel/{name}"
        assert s[key] > 0
    # the zero-initialised fusion grew from 0: its absolute drift is its norm
    assert s["drift/abs/car_skip_linear.0"] == pytest.approx(s["norm/car_skip_linear.0"], rel=1e-6)
    assert vis.history[3]["grad/total"] == g["grad/total"]  # extra is recorded with the step
    assert 0 < s["update/total"] < 1
    # no step since the last call: no update, same drift
    again = vis.stats(step=4)
    assert again["update/total"] == 0.0 and again["drift/rel/total"] == pytest.approx(s["drift/rel/total"])
    assert again["grad/total"] > 0  # the grads of the last backward are still there


def test_guards_fire_on_a_changed_base_a_base_gradient_and_a_missing_branch_gradient():
    pilot = make_pilot()
    inputs = make_inputs()
    vis = ParameterChangeVisualizer(pilot)
    loss_of(pilot, inputs).backward()
    assert vis.stats()["frozen/max_abs_change"] == 0.0
    p = base_param(pilot)
    with torch.no_grad():
        p.view(-1)[0] += 1e-3
    assert vis.stats()["frozen/max_abs_change"] == pytest.approx(1e-3, rel=1e-3)
    p.grad = torch.ones_like(p)
    pilot.car_parameters()[0].grad = None
    g = vis.grad_stats()
    assert g["frozen/params_with_grad"] == 1 and g["trainable/params_without_grad"] == 1


def test_fusion_strength_is_zero_at_init_and_positive_after_training():
    pilot = make_pilot()
    inputs = make_inputs()
    text, targets, ctrl = inputs
    pilot.train()
    f0 = fusion_strength(pilot, text, targets.x_BLC_wo_prefix, SCHEDULE, ctrl)
    keys = {f"fusion/j{j}/s{k}" for j in range(2) for k in range(len(SCHEDULE))} | {"fusion/mean"}
    assert set(f0) == keys and all(v == 0.0 for v in f0.values())  # residual mode: the untrained pilot is the base
    assert pilot.training and pilot.fusion_probe is None  # mode and probe restored
    train(pilot, optimizer_for(pilot), inputs, 2)
    f1 = fusion_strength(pilot, text, targets.x_BLC_wo_prefix, SCHEDULE, ctrl, valid=torch.tensor([True, False]))
    assert all(f1[k] > 0 for k in keys)


def test_save_plot_writes_a_decodable_png(tmp_path):
    pilot = make_pilot()
    inputs = make_inputs()
    opt = optimizer_for(pilot)
    vis = ParameterChangeVisualizer(pilot, save_dir=tmp_path / "d")
    for step in range(3):
        train(pilot, opt, inputs, 1)
        vis.stats(step=10 * step)
    path = vis.save_plot()
    assert path == tmp_path / "d" / "drift.png"
    log_path = vis.save_plot(tmp_path / "log.png", log_y=True)
    for p in (path, log_path):
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] == 960 and img.size[1] >= 2 * 280  # rel and abs panels
            assert len(img.convert("RGB").getcolors(1 << 16)) > 5  # lines, not a blank page
    assert plot_drift_history({}).size[1] > 0


def test_visualizer_finds_the_pilot_inside_a_wrapper_and_rejects_a_model_without_branch():
    pilot = make_pilot()
    holder = nn.Module()
    holder.model = pilot
    assert ParameterChangeVisualizer(holder).model is pilot
    with pytest.raises(ValueError, match="car_"):
        ParameterChangeVisualizer(nn.Linear(2, 2))


class FakePilotModule(nn.Module):
    """What the callback uses of a PilotModule: .model, compute_loss, schedule_for."""

    def __init__(self, pilot: InfinityPilot) -> None:
        super().__init__()
        self.model = pilot

    def schedule_for(self, batch):
        return SCHEDULE

    def compute_loss(self, batch, noise: bool, drop_control: bool):
        return {"loss": loss_of(self.model, batch["inputs"])}


class RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))


def test_callback_logs_every_n_steps_with_fusion_and_writes_the_chart(tmp_path):
    pilot = make_pilot()
    module = FakePilotModule(pilot)
    inputs = make_inputs()
    batch = {"inputs": inputs, "valid": torch.tensor([True, True])}
    opt = optimizer_for(pilot)
    log = RecordingLogger()
    trainer = SimpleNamespace(global_step=0, loggers=[log], default_root_dir=str(tmp_path))
    cb = ParameterDriftCallback(every_n_steps=2, plot_every_n_steps=4, fusion_every_n_steps=3)
    module.train()
    cb.on_train_start(trainer, module)
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        loss_of(pilot, inputs).backward()
        cb.on_before_optimizer_step(trainer, module, opt)
        opt.step()
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, batch, i)
    assert [s for s, _ in log.logged] == [1, 2, 3, 4]  # first step, every 2nd, and the fusion step 3
    by_step = dict(log.logged)
    for step in (1, 2, 4):
        m = by_step[step]
        assert m["frozen/max_abs_change"] == 0 and m["frozen/params_with_grad"] == 0
        assert m["trainable/params_without_grad"] == 0 and m["update/total"] > 0 and "grad/car_blocks.0" in m
    assert set(by_step[3]) == {f"fusion/j{j}/s{k}" for j in range(2) for k in range(len(SCHEDULE))} | {"fusion/mean"}
    assert by_step[3]["fusion/mean"] > 0 and module.training and pilot.fusion_probe is None
    assert sorted(cb.visualizer.history) == [1, 2, 3, 4]
    png = tmp_path / "drift" / "drift.png"
    assert png.exists()  # plot_every_n_steps=4
    png.unlink()
    cb.on_train_end(trainer, module)
    assert Image.open(png).size[0] == 960


def test_strict_callback_raises_when_the_base_changes(tmp_path):
    pilot = make_pilot()
    module = FakePilotModule(pilot)
    trainer = SimpleNamespace(global_step=0, loggers=[], default_root_dir=str(tmp_path))
    cb = ParameterDriftCallback(every_n_steps=1, strict=True)
    cb.on_train_start(trainer, module)
    loss_of(pilot, make_inputs()).backward()
    cb.on_before_optimizer_step(trainer, module, None)
    with torch.no_grad():
        base_param(pilot).view(-1)[0] += 1.0
    trainer.global_step = 1
    with pytest.raises(RuntimeError, match="frozen/max_abs_change"):
        cb.on_train_batch_end(trainer, module, None, {}, 0)


# ---------------------------------------------------------------------- FSDP2, two CPU ranks

RANK_SCRIPT = textwrap.dedent(
    """
    import copy, datetime, json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    sys.path.insert(0, sys.argv[4])
    from test_drift import SCHEDULE, loss_of, make_inputs, make_pilot
    from scenetxtvar.training.drift import ParameterChangeVisualizer, fusion_strength


    def no_full_tensor(self, *args, **kwargs):
        raise AssertionError("full_tensor called in the monitoring path")


    def run(pilot, vis_steps, sharded):
        inputs = make_inputs()
        opt = torch.optim.AdamW([p for p in pilot.parameters() if p.requires_grad], lr=1e-2)
        vis = ParameterChangeVisualizer(pilot)
        out = []
        original = DTensor.full_tensor
        for _ in range(vis_steps):
            opt.zero_grad(set_to_none=True)
            loss_of(pilot, inputs).backward()
            DTensor.full_tensor = no_full_tensor
            try:
                g = vis.grad_stats()
                vis.mark()
            finally:
                DTensor.full_tensor = original
            opt.step()
            DTensor.full_tensor = no_full_tensor
            try:
                out.append(vis.param_stats(extra=g))
            finally:
                DTensor.full_tensor = original
        text, targets, ctrl = inputs
        out.append(fusion_strength(pilot, text, targets.x_BLC_wo_prefix, SCHEDULE, ctrl))
        return out


    def main():
        rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        pilot = make_pilot()
        reference = copy.deepcopy(pilot)
        mesh = init_device_mesh("cpu", (2,))
        for blk in [*pilot.block_list, *pilot.car_blocks]:
            fully_shard(blk, mesh=mesh)
        fully_shard(pilot, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in pilot.parameters())
        # Same batch on both ranks: FSDP2's averaged gradient is the single-process gradient.
        sharded = run(pilot, 2, True)
        single = run(reference, 2, False)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"sharded": sharded, "single": single}, f)
        dist.barrier()
        dist.destroy_process_group()


    main()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow  # two processes importing torch + FSDP2 setup: ~10-25 s
def test_fsdp2_sharded_stats_match_the_unsharded_model(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out.json"
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), port, str(out), str(Path(__file__).parent)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    try:
        logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, text) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{text[-4000:]}"
    result = json.loads(out.read_text())
    for sharded, single in zip(result["sharded"], result["single"]):
        assert set(sharded) == set(single)
        for key, value in single.items():
            assert sharded[key] == pytest.approx(value, rel=2e-3, abs=1e-6), key
    last = result["sharded"][1]
    assert last["frozen/max_abs_change"] == 0 and last["frozen/params_with_grad"] == 0
    assert last["trainable/params_without_grad"] == 0 and last["update/total"] > 0
