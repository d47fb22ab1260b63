"""The on-disk format: a manifest (`qgplm_export.json`) next to one safetensors file.

    <dir>/model.safetensors     packed codes (`<key>.codes`, uint8), scales (`<key>.scale`, fp32)
                                and the tensors kept in floating point (under their state-dict key)
    <dir>/config.json           the Hugging Face model config (+ generation_config.json if any)
    <dir>/tokenizer files       as written by the tokenizer's save_pretrained
    <dir>/qgplm_export.json     format version, bit-widths, quantizer, which tensors are packed,
                                the quantized-module structure, and the SHA-256 of every file above

No pickle anywhere: safetensors and JSON only. The manifest is written last (atomically), so a
directory without one is an interrupted export. `verify_checksums` runs before any tensor is
read, so a truncated or modified file is refused instead of silently loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qgplm.errors import QgplmError
from qgplm.io import atomic_write_text

FORMAT = "qgplm-export"
FORMAT_VERSION = 1
MANIFEST = "qgplm_export.json"
WEIGHTS = "model.safetensors"


def empty_out_dir(out_dir: str | Path) -> Path:
    """The output folder of an export (any format), refused if it already holds files, so nothing of
    the user's is overwritten."""
    if "\0" in str(out_dir):
        raise QgplmError(f"out={str(out_dir)!r} holds a NUL character: choose a new out=<dir>")
    out = Path(out_dir).expanduser()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise QgplmError(f"out={out} is a file, not a directory: choose a new out=<dir>")
        if any(out.iterdir()):
            raise QgplmError(f"export dir {out} is not empty: choose a new out=<dir>")
    # nothing is created here: the first existing folder above out= must be a writable directory
    base = out
    while not (base.exists() or base.is_symlink()) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise QgplmError(f"cannot write to out={out}: {base} is a file, not a directory; choose a new out=<dir>")
    if not os.access(base, os.W_OK | os.X_OK):
        raise QgplmError(f"cannot write to out={out}: {base} is not writable; choose a writable out=<dir>")
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksums(out_dir: Path) -> dict[str, str]:
    """SHA-256 of every regular file in `out_dir` except the manifest, by relative path."""
    out = {}
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            out[p.relative_to(out_dir).as_posix()] = sha256_file(p)
    return out


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": checksums(out_dir)}
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(export_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    d = Path(export_dir).expanduser()
    path = d / MANIFEST
    if not path.is_file():
        raise QgplmError(f"{d} is not a qgplm export (no {MANIFEST}): pass a directory written by "
                         f"`python -m qgplm.export ckpt=... out=...`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QgplmError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}): the export is "
                         f"corrupt, export the model again") from None
    if manifest.get("format") != FORMAT:
        raise QgplmError(f"{path} is not a qgplm export manifest: export the model again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QgplmError(f"{d} has export format version {manifest.get('format_version')}, this qgplm reads "
                         f"version {FORMAT_VERSION}: export the model again with this version")
    return d, manifest


def verify_checksums(export_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists must exist with the recorded SHA-256."""
    files = manifest.get("files") or {}
    if WEIGHTS not in files:
        raise QgplmError(f"{export_dir / MANIFEST} lists no {WEIGHTS}: the export is corrupt, export it again")
    for rel, digest in sorted(files.items()):
        p = export_dir / rel
        if not p.is_file():
            raise QgplmError(f"{p} is missing from the export: copy the whole directory or export it again")
        if sha256_file(p) != digest:
            raise QgplmError(f"checksum mismatch for {p}: the file is truncated or was modified, export the "
                             f"model again")
