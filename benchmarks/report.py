"""Shared by the benchmark scripts: where a number was measured, and one way to emit the JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any


def environment() -> dict[str, Any]:
    """The facts a benchmark number needs next to it."""
    import torch

    return dict(
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        processor=platform.processor(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        load_avg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print the report as JSON and, with ``out``, write it there too."""
    text = json.dumps({**environment(), **report}, indent=1)
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
