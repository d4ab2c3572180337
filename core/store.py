"""Content-addressed artifact store: `<root>/<stage>/<fingerprint>/` with a `manifest.json`.

An artifact is complete exactly when its folder exists under its final name with a
manifest. Work happens in `<root>/<stage>/.partial-<fingerprint>/`, which survives a crash
(so a stage such as quantize can resume block by block) and is renamed into place only
after the manifest has been written. One process at a time holds an artifact's lock, so
two sweep jobs that need the same artifact compute it once and the other reuses it. Before
a complete artifact is reused its files are checked against its manifest (`Entry.reusable`);
a corrupted one is removed and computed again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

MANIFEST = "manifest.json"
# Before a complete artifact is reused, every output's size is checked, and the sha256 of
# outputs up to this size (calibration sets, JSON, small checkpoints) too.
HASH_CHECK_MAX_BYTES = 16 << 20


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks.

    Args:
        path: the file.

    Returns:
        The full lowercase hex digest (64 characters).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_outputs(folder: Path, outputs: list[dict]) -> Optional[str]:
    """Check files against manifest entries {path, bytes, sha256}; returns the first problem or None.

    Sizes always; the sha256 only for files up to HASH_CHECK_MAX_BYTES (a large checkpoint is
    read once when written, not at every reuse).
    """
    for out in outputs:
        path = folder / out["path"]
        if not path.is_file():
            return f"{out['path']} is missing"
        size = path.stat().st_size
        if out.get("bytes") is not None and size != out["bytes"]:
            return f"{out['path']} has {size} bytes, the manifest says {out['bytes']}"
        if size <= HASH_CHECK_MAX_BYTES and sha256_file(path) != out["sha256"]:
            return f"{out['path']} does not match the sha256 in the manifest"
    return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "autoround-pipeline", "lm_eval", "vllm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Work:
    """An artifact being written: the folder to write into, and `finish` to seal it."""

    entry: "Entry"
    path: Path
    started: str
    resumed: bool
    manifest: Optional[dict] = None

    def finish(self, config: dict, inputs: dict[str, str], metrics: dict[str, float],
               summary: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
        """Hash every output file and write the manifest (last). Returns the manifest."""
        outputs = []
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"):
                outputs.append({"path": str(p.relative_to(self.path)), "sha256": sha256_file(p),
                                "bytes": p.stat().st_size})
        manifest = {
            "stage": self.entry.stage, "fingerprint": self.entry.fingerprint, "config": config, "inputs": inputs,
            "outputs": outputs, "metrics": metrics, "summary": summary or {}, "started": self.started,
            "ended": now_iso(), "versions": package_versions(), "git_commit": git_commit(),
            "host": platform.node(), "argv": sys.argv,
        }
        if extra:
            manifest.update(extra)
        _write_json_atomic(self.path / MANIFEST, manifest)
        self.manifest = manifest
        return manifest


class Entry:
    """One artifact slot `<root>/<stage>/<fingerprint>`."""

    def __init__(self, root: Path, stage: str, fp: str):
        self.stage, self.fingerprint = stage, fp
        self.path = root / stage / fp
        self.partial = root / stage / f".partial-{fp}"
        self.lockfile = root / stage / f".{fp}.lock"

    def is_complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict:
        with open(self.path / MANIFEST) as f:
            return json.load(f)

    def problem(self) -> Optional[str]:
        """What is wrong with this complete artifact's files against its manifest, or None."""
        try:
            manifest = self.manifest()
            outputs = manifest["outputs"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST} is unreadable ({type(exc).__name__})"
        if manifest.get("stage") != self.stage or manifest.get("fingerprint") != self.fingerprint:
            return f"{MANIFEST} names {manifest.get('stage')}/{manifest.get('fingerprint')}"
        return verify_outputs(self.path, outputs)

    def reusable(self, log: Callable[[str], None]) -> bool:
        """True for a complete artifact whose files match its manifest.

        A corrupted one (a truncated, missing or altered file) is removed, with one log line,
        so that the caller computes it again.
        """
        if not self.is_complete():
            return False
        if self.problem() is None:
            return True
        with self.lock():  # another process may have replaced it meanwhile
            problem = self.problem() if self.is_complete() else None
            if problem is not None:
                log(f"[{self.stage}] stored artifact {self.path} is corrupted ({problem}): removed, computing it again")
                self._discard()
        return self.is_complete()

    def _discard(self) -> None:
        trash = self.path.with_name(f".trash-{self.fingerprint}-{os.getpid()}")
        os.replace(self.path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.lockfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lockfile, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def remove(self) -> None:
        """Delete the complete artifact (used by run.force)."""
        with self.lock():
            if self.path.exists():
                self._discard()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Optional[Work]]:
        """Hold the lock and yield a Work folder; seal it into place once `finish` was called.

        Yields None when another process completed the artifact while we waited for the
        lock (nothing to do). An exception leaves the partial folder for resuming and never
        a manifest in place.
        """
        with self.lock():
            if self.is_complete():
                yield None
                return
            resumed = self.partial.exists()
            self.partial.mkdir(parents=True, exist_ok=True)
            work = Work(self, self.partial, now_iso(), resumed)
            yield work
            if work.manifest is None:
                raise RuntimeError(f"stage {self.stage} finished without writing its manifest")
            if self.path.exists():  # a forced rerun replaces the old artifact
                self._discard()
            os.replace(self.partial, self.path)


class ArtifactStore:
    """The store under `<outputs_dir>/store`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def entry(self, stage: str, fp: str) -> Entry:
        return Entry(self.root, stage, fp)

    def complete_entries(self, stage: str) -> list[Entry]:
        folder = self.root / stage
        if not folder.is_dir():
            return []
        return [Entry(self.root, stage, p.name) for p in sorted(folder.iterdir())
                if not p.name.startswith(".") and (p / MANIFEST).is_file()]


def _link_or_copy(s: str, d: str) -> None:
    try:
        os.link(s, d)
    except OSError:
        shutil.copy2(s, d)


def export_artifact(src: Path, dest: Path, metrics: Optional[dict] = None) -> None:
    """Mirror a complete artifact at a stable path (for DVC outs) with hard links, atomically.

    With `metrics`, also write them to `<dest>.metrics.json` beside the folder (a DVC metrics
    file may not live inside another output).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, dest)
    if metrics is not None:
        _write_json_atomic(dest.with_name(dest.name + ".metrics.json"), metrics)


def import_exported(src: Path, entry: Entry) -> bool:
    """Put an exported artifact back into the store when it is the one `entry` expects.

    DVC restores outputs (`dvc checkout`, `dvc pull`, its run cache) at the export paths only;
    a later stage finds its inputs in the store, so a complete export whose manifest names the
    same stage and fingerprint is linked back in. Returns True when the entry is now complete.
    """
    manifest_path = src / MANIFEST
    if entry.is_complete():
        return True
    if not manifest_path.is_file():
        return False
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("stage") != entry.stage or manifest.get("fingerprint") != entry.fingerprint:
        return False
    with entry.lock():
        if not entry.is_complete():
            tmp = entry.path.with_name(f".import-{entry.fingerprint}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, copy_function=_link_or_copy)
            os.replace(tmp, entry.path)
    return True
