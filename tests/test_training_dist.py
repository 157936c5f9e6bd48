"""2-process training on CPU (gloo) through ``train.py``: DDP and FSDP2 train, checkpoint, export, resume.

Lightning launches the second process itself (it re-runs ``train.py`` with the same Hydra overrides plus
``hydra.run.dir`` of the first). Each run trains 4 steps with a checkpoint every 2; the resume starts from
the step-2 checkpoint in a fresh run directory and must reproduce the uninterrupted run's step-4 weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scenetxtvar.models.pilot import is_car_key

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# Variables that would make Lightning believe it runs under torchrun/SLURM (or reuse a parent's port).
LAUNCH_VARS = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PL_")


def train(run_dir: Path, cache: Path, strategy: str, *overrides: str, timeout: float = 240) -> str:
    """``python train.py`` on 2 CPU processes; returns the combined output, fails with its tail."""
    cmd = [
        sys.executable,
        "train.py",
        f"strategy={strategy}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "debug=fast",
        "callbacks=minimal",
        "logger=csv",
        "trainer.max_steps=4",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    # A new session: on a timeout the whole group goes, including the rank Lightning started.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"train.py {strategy} timed out after {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"train.py {strategy} failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-cache")


def fresh_model():
    """The single-process model the runs start from (conf/model/tiny.yaml, seed 0, glyph control)."""
    from scenetxtvar.training.builders import build_pilot

    return build_pilot(
        "infinity_pilot_tiny",
        car_depth=2,
        fusion="residual",
        car_init="copy",
        seed=0,
        conditioning_channels=3,
        condition_names=["glyph"],
    )


def check_export_loads_in_one_process(export: Path) -> dict[str, torch.Tensor]:
    """The consolidated export loads into a plain model: CAR tensors equal the file and differ from the init."""
    from scenetxtvar.checkpoint import load_car_weights

    car = load_file(export / "car_weights.safetensors")
    assert car and all(is_car_key(k) for k in car)
    assert (export / "car_config.json").exists()
    init, model = fresh_model(), fresh_model()
    load_car_weights(model, export / "car_weights.safetensors")
    sd0, sd1 = init.state_dict(), model.state_dict()
    assert set(car) == {k for k in sd1 if is_car_key(k)}
    assert all(torch.equal(sd1[k], car[k]) for k in car)  # full tensors, not one rank's shard
    assert any(not torch.equal(sd0[k], car[k]) for k in car)  # trained
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if not is_car_key(k))  # the base untouched
    return car


def check_checkpoint(path: Path, strategy: str) -> None:
    """What Lightning wrote: one file (DDP) or a torch.distributed.checkpoint folder (FSDP2); CAR tensors only."""
    if strategy == "ddp":
        assert path.is_file()
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        keys = [k.removeprefix("model.") for k in ckpt["state_dict"]]
        assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    else:
        from torch.distributed.checkpoint import FileSystemReader

        assert path.is_dir()
        assert {p.name for p in path.iterdir()} == {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"}
        ckpt = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        assert "state_dict" not in ckpt and "optimizer_states" not in ckpt and ckpt["lr_schedulers"]
        saved = list(FileSystemReader(path).read_metadata().state_dict_metadata)
        keys = [k.removeprefix("state_dict.model.") for k in saved if k.startswith("state_dict.")]
        assert any(k.startswith("optimizer_0.state.") for k in saved)
    assert ckpt["global_step"] == 4
    assert keys and all(is_car_key(k) for k in keys)  # the frozen base is left out
    assert ckpt["scenetxtvar"]["base_fingerprint"].numel() > 0


_RUNS: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_training_checkpoints_exports_and_resumes(strategy, tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp(f"{strategy}-run")
    out = train(run_dir, cache, strategy)
    # Both ranks ran, and the DataModule took its rank and world size from the trainer.
    assert "train loader: resampled split, rank 0/2" in out and "train loader: resampled split, rank 1/2" in out
    ckpts = run_dir / "checkpoints"
    check_checkpoint(ckpts / "last.ckpt", strategy)
    car = check_export_loads_in_one_process(run_dir / "export")
    _RUNS[strategy] = (run_dir, car)

    # Resume from the step-2 checkpoint for 2 more steps: the same weights as the uninterrupted run.
    resumed_dir = tmp_path_factory.mktemp(f"{strategy}-resumed")
    out = train(resumed_dir, cache, strategy, f"ckpt_path='{ckpts / 'epoch=0-step=2.ckpt'}'")
    assert "Restored all states from the checkpoint" in out
    check_checkpoint(resumed_dir / "checkpoints" / "last.ckpt", strategy)
    resumed = load_file(resumed_dir / "export" / "car_weights.safetensors")
    assert resumed.keys() == car.keys()
    diff = [k for k in car if not torch.equal(car[k], resumed[k])]
    assert not diff, f"the resumed run differs from the uninterrupted one in {len(diff)} tensors, e.g. {diff[:3]}"


def test_fsdp_and_ddp_learn_the_same_weights():
    """FSDP2 shards parameters and reduce-scatters gradients; the result matches DDP's all-reduce."""
    if set(_RUNS) != {"ddp", "fsdp"}:
        pytest.skip("needs both runs of test_two_process_training_checkpoints_exports_and_resumes")
    ddp, fsdp = _RUNS["ddp"][1], _RUNS["fsdp"][1]
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-6, msg=k)
