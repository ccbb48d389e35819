"""Where a benchmark's JSON goes: --json PATH if given, else $OUT/<name> when OUT is set (the device tool's
output folder; run_gpu.sh sets it per step), else nowhere; where the shared text data is; which CPU ran it."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def write_json(data: dict, path: str | None, name: str) -> Path | None:
    """Write `data` (indented; values JSON cannot hold as str) and return the file, or None."""
    target = Path(path) if path else (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=1, default=str))
    return target


_REPO = Path(__file__).resolve().parent.parent
# ../shared beside the checkout; on the GPU machine (which gets the checkout alone) the copy carried in .shared/
SHAKESPEARE = next((d / "data" / "tinyshakespeare.txt" for d in (_REPO.parent / "shared", _REPO / ".shared")
                    if (d / "data" / "tinyshakespeare.txt").is_file()),
                   _REPO.parent / "shared" / "data" / "tinyshakespeare.txt")


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), for the tables that say which machine measured them."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name"))
        return next(names, platform.processor() or "unknown CPU")
    return platform.processor() or "unknown CPU"
