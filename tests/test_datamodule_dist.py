"""SceneTextDataModule across 2 processes (torch.distributed gloo): equal steps, disjoint exact splits, no copies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_datamodule import write_shards

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
WORLD = 2

# Each rank iterates train (resampled) and val (exact) for every worker count, all-reducing once per
# batch as DDP does: a rank with fewer batches would leave the other blocked (the gloo timeout fails it).
RANK_SCRIPT = textwrap.dedent(
    """
    import datetime, json, sys
    import torch
    import torch.distributed as dist
    from scenetxtvar.data.datamodule import SceneTextDataModule


    def main():
        rank, port, root, out, ctx = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
        workers_list = [int(w) for w in sys.argv[6].split(",")]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        result = {}
        for workers in workers_list:
            dm = SceneTextDataModule(train_shards=root, val_shards=root, conditions=["glyph"], pn="0.06M",
                                     batch_size=2, num_workers=workers, epoch_samples=24, rank=rank, world_size=2,
                                     shuffle_buffer=4, multiprocessing_context=None if ctx == "default" else ctx)
            for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
                steps, keys = 0, []
                for batch in loader:
                    dist.all_reduce(torch.ones(1))
                    steps += 1
                    keys += [m["key"] for m, v in zip(batch["meta"], batch["valid"].tolist()) if v]
                result[f"{split}/{workers}"] = {"steps": steps, "len": len(loader), "keys": keys}
        inferred = SceneTextDataModule(train_shards=root, conditions=["glyph"], num_workers=0)
        result["inferred"] = list(inferred._dist_info())  # no explicit rank: read from torch.distributed
        dist.barrier()
        dist.destroy_process_group()
        with open(out, "w") as f:
            json.dump(result, f)


    if __name__ == "__main__":  # spawned DataLoader workers import this file again
        main()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, args_for_rank, tmp_path: Path, timeout: float = 240) -> None:
    """Start one process per rank running ``script`` and wait; fail with their output on error."""
    path = tmp_path / "rank_script.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(path), *args_for_rank(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for r in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"


def check_results(results: list[dict], keys: list[str], workers: int) -> None:
    train = [r[f"train/{workers}"] for r in results]
    val = [r[f"val/{workers}"] for r in results]
    # resampled: the same fixed number of steps on both ranks, different streams
    assert train[0]["steps"] == train[1]["steps"] == train[0]["len"] == 24 // (WORLD * 2)
    assert train[0]["keys"] != train[1]["keys"]
    # exact: same number of steps, disjoint samples, union = everything
    assert val[0]["steps"] == val[1]["steps"] == val[0]["len"] == val[1]["len"]
    assert not set(val[0]["keys"]) & set(val[1]["keys"])
    assert sorted(val[0]["keys"] + val[1]["keys"]) == sorted(keys)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("dist_shards")
    return root, write_shards(root)


def test_two_ranks_fork_workers(shard_dir, tmp_path):
    root, keys = shard_dir
    port = free_port()
    run_ranks(
        RANK_SCRIPT, lambda r: [str(r), str(port), str(root), str(tmp_path / f"r{r}.json"), "default", "0,2"], tmp_path
    )
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(WORLD)]
    assert [r["inferred"] for r in results] == [[0, 2], [1, 2]]
    for workers in (0, 2):
        check_results(results, keys, workers)


@pytest.mark.slow
def test_two_ranks_spawn_workers(shard_dir, tmp_path):
    # Spawned workers cannot see the rank; the DataModule hands it over explicitly, so nothing duplicates.
    root, keys = shard_dir
    port = free_port()
    run_ranks(
        RANK_SCRIPT, lambda r: [str(r), str(port), str(root), str(tmp_path / f"r{r}.json"), "spawn", "2"], tmp_path
    )
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(WORLD)]
    check_results(results, keys, 2)


LIGHTNING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from scenetxtvar.data.datamodule import SceneTextDataModule

    root, out_dir = sys.argv[1], sys.argv[2]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(9, 1)
            self.val_keys, self.train_steps = {}, 0

        def training_step(self, batch, batch_idx):
            self.train_steps += 1
            x = torch.cat([batch["images"], batch["controls"]], 1).mean((2, 3))
            return self.lin(x).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            if self.trainer.sanity_checking:
                return
            keys = [m["key"] for m, v in zip(batch["meta"], batch["valid"].tolist()) if v]
            self.val_keys.setdefault(str(self.current_epoch), []).extend(keys)
            x = torch.cat([batch["images"], batch["controls"]], 1).mean((2, 3))
            self.log("val/loss", self.lin(x).pow(2).mean(), sync_dist=True, batch_size=len(keys) or 1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = SceneTextDataModule(train_shards=root, val_shards=root, conditions=["glyph", "normal"], pn="0.06M",
                             batch_size=2, num_workers=1, epoch_samples=16)
    model = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"train_steps": model.train_steps, "global_step": trainer.global_step, "val_keys": model.val_keys,
                   "rank": list(dm._dist_info()), "bad": dm.bad_sample_counts}, f)
    """
)


@pytest.mark.slow
def test_lightning_ddp_fit(shard_dir, tmp_path):
    root, keys = shard_dir
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(tmp_path)], env=env, capture_output=True, timeout=400, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["rank"] for r in results] == [[0, 2], [1, 2]]
    assert results[0]["train_steps"] == results[1]["train_steps"] == 2 * 16 // (WORLD * 2)
    for epoch in ("0", "1"):
        a, b = (set(r["val_keys"][epoch]) for r in results)
        assert not a & b and sorted(a | b) == sorted(keys)
