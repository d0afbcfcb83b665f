"""The checkpoint manifest: what a complete checkpoint contains, and how to check it still does.

``manifest.json`` is written last, after every other file is fsynced, and lists each file with its
size and sha256. A directory without a manifest, or whose files disagree with it, is not a
checkpoint. Layout of the run directory::

    run_dir/checkpoints/
        step-00000010/            one complete checkpoint (see gspo.checkpoint.save)
            manifest.json         {"format", "format_version", "step", "files": {name: {size, sha256}}}
        step-00000020/
        latest                    "step-00000020\\n" (informational; loading never reads it)
        .tmp-step-00000030-...    a save in progress or killed mid-write: ignored, removed next save
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path, PurePosixPath

from gspo.checkpoint._fs import fsync_dir, hash_and_fsync, sha256_file, write_bytes_durable
from gspo.errors import CheckpointError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "gspo-checkpoint"
FORMAT_VERSION = 1  # bump when the layout changes in a way older readers would misread
STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def checkpoints_root(run_dir: str | Path) -> Path:
    """The directory holding a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    """``step-00000010``: zero-padded so names sort like steps (up to 10^8; parsing never relies on it)."""
    return f"step-{step:08d}"


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Published checkpoint directories under ``root`` as ``(step, path)``, newest step first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def write_manifest(ckpt_dir: Path, step: int) -> dict:
    """fsync every file under ``ckpt_dir``, then write ``manifest.json`` describing them (last)."""
    files = {}
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file()):
        size, digest = hash_and_fsync(path)
        files[path.relative_to(ckpt_dir).as_posix()] = {"size": size, "sha256": digest}
    for sub in sorted(p for p in ckpt_dir.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step,
                "created_unix": time.time(), "files": files}
    write_bytes_durable(ckpt_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    fsync_dir(ckpt_dir)
    return manifest


def read_manifest(ckpt_dir: Path) -> dict:
    """Parse and sanity-check ``manifest.json``; raise :class:`CheckpointError` saying what is wrong."""
    path = ckpt_dir / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the save was interrupted before it finished (the manifest "
                              "is written last). Resume from an earlier checkpoint or delete this directory")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt, "
                              "resume from an earlier one") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a gspo checkpoint manifest (format != {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}; this gspo reads up to "
                              f"{FORMAT_VERSION}. Upgrade gspo to load it")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{path} lacks 'files' or 'step'; the checkpoint is corrupt")
    return manifest


def verify_checkpoint(ckpt_dir: str | Path, *, deep: bool = True) -> dict:
    """Check every file listed in the manifest is present with the right size (and, if ``deep``, sha256).

    Returns the manifest. Raises :class:`CheckpointError` naming the first bad file and the mismatch.
    ``deep=False`` skips hashing: it catches interrupted and truncated saves cheaply, not bit rot.
    """
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for rel, entry in sorted(manifest["files"].items()):
        _verify_file(ckpt_dir, rel, entry, deep=deep)
    return manifest


def _verify_file(ckpt_dir: Path, rel: str, entry: dict, *, deep: bool) -> None:
    """Check one manifest entry against the file on disk."""
    if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
        raise CheckpointError(f"{ckpt_dir / MANIFEST_NAME} lists a path outside the checkpoint: {rel!r}")
    path = ckpt_dir / rel
    if not path.is_file():
        raise CheckpointError(f"{path} is listed in the manifest but missing; the checkpoint is incomplete, "
                              "resume from an earlier one")
    size = path.stat().st_size
    if size != entry.get("size"):
        raise CheckpointError(f"{path} has {size} bytes but the manifest says {entry.get('size')} "
                              "(truncated or overwritten); resume from an earlier checkpoint")
    if deep:
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            raise CheckpointError(f"{path} has sha256 {digest[:16]}... but the manifest says "
                                  f"{str(entry.get('sha256'))[:16]}... (corrupted after it was written); "
                                  "resume from an earlier checkpoint")
