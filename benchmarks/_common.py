"""Shared by the benchmark scripts: each owns one `## ` section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    host = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    return f"{torch.cuda.get_device_name()}; {host}" if torch.cuda.is_available() else host


def matmul_gflops() -> float:
    """fp32 2048x2048 matmul rate of this machine now (it varies from day to day): the ceiling's unit."""
    import torch

    a = torch.randn(2048, 2048)
    a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    return 2 * 2048**3 * 10 / (time.perf_counter() - t) / 1e9


def update_section(title: str, body: str, path: Path = DOC) -> Path:
    """Replace (or add) the section `## title` of the file, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head, *sections = text.split("\n## ")
    sections = [s for s in sections if not s.startswith(title)]
    sections.append(f"{title}\n\n{body.strip()}\n")
    path.parent.mkdir(exist_ok=True)
    path.write_text(head.rstrip() + "\n" + "".join("\n## " + s.rstrip() + "\n" for s in sorted(sections)))
    return path
