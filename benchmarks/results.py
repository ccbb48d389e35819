"""Where a benchmark's JSON goes: --json PATH if given, else $OUT/<name> when OUT is set (the device tool's
output folder; run_gpu.sh sets it per step), else nowhere; and where the shared text data is."""
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


_REPO = Path(__file__).resolve().parent.parent
# ../shared beside the checkout; on the GPU machine (which gets the checkout alone) the copy carried in .shared/
SHAKESPEARE = next((d / "data" / "tinyshakespeare.txt" for d in (_REPO.parent / "shared", _REPO / ".shared")
                    if (d / "data" / "tinyshakespeare.txt").is_file()),
                   _REPO.parent / "shared" / "data" / "tinyshakespeare.txt")
