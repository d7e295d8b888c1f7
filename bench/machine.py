"""What every benchmark records about the machine it ran on, and how it writes its results."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> dict[str, Any]:
    """CPU, core count, platform, Python, torch, load and date; benches add their own keys."""
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_results(prefix: Path, result: dict[str, Any], markdown: str) -> None:
    """PREFIX.json and PREFIX.md (under bench/results/ by default), and the Markdown on stdout."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    prefix.with_suffix(".md").write_text(markdown)
    print(markdown)
