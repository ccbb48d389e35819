"""Where a benchmark's JSON goes: --json PATH if given, else $OUT/<name> when OUT is set (the device tool's
output folder; run_gpu.sh sets it per step), else nowhere."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(data: dict, path: str | None, name: str) -> Path | None:
    """Write `data` (indented; values JSON cannot hold as str) and return the file, or None."""
    target = Path(path) if path else (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=1, default=str))
    return target
