"""The sampling defaults a checkpoint's authors ship in generation_config.json (Llama 3 Instruct: temperature
0.6, top_p 0.9), for the server to use where a request leaves a field unset, as vLLM's `--generation-config
auto` and transformers' `generate` do. Only the keys present are taken; a value outside its field's range
is dropped with the reason, so a stray file cannot make every request fail."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

# key -> the values it may take (the server's own validation applies the same bounds to requests)
_FIELDS = {
    "temperature": lambda v: 0.0 <= v <= 2.0,
    "top_p": lambda v: 0.0 < v <= 1.0,
    "top_k": lambda v: v >= 0 and float(v).is_integer(),
    "min_p": lambda v: 0.0 <= v <= 1.0,
    "repetition_penalty": lambda v: v > 0.0,
}


def sampling_defaults(model_dir: str | Path | None) -> dict[str, float]:
    """{field: value} from model_dir/generation_config.json (empty when there is none)."""
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: not read (%s); no sampling defaults from it", path, exc)
        return {}
    out = {}
    for key, ok in _FIELDS.items():
        value = raw.get(key) if isinstance(raw, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not ok(value):
            log.warning("%s: %s = %r is out of range; ignored", path, key, value)
            continue
        out[key] = int(value) if key == "top_k" else float(value)
    return out
