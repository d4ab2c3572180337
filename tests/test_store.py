"""Artifact store: fingerprints, skip-when-complete, atomicity under a crash, locking."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from core.store import MANIFEST, ArtifactStore, export_artifact, fingerprint


def test_fingerprint_is_stable_and_order_independent():
    a = fingerprint({"stage": "quantize", "config": {"bits": 4, "group_size": 128}, "inputs": {"calibrate": "x"}})
    b = fingerprint({"inputs": {"calibrate": "x"}, "config": {"group_size": 128, "bits": 4}, "stage": "quantize"})
    assert a == b
    # a pinned value: changing the hashing scheme would silently invalidate every user's cache
    assert fingerprint({"a": 1}) == "015abd7f5cc57a2d"
    assert fingerprint({"a": 2}) != fingerprint({"a": 1})


def test_finished_artifact_has_manifest_with_hashes(tmp_path):
    entry = ArtifactStore(tmp_path).entry("calibrate", "abc")
    with entry.writing() as work:
        (work.path / "calib.bin").write_bytes(b"hello")
        work.finish(config={"calib": {"nsamples": 1}}, inputs={}, metrics={"tokens": 5.0})
    assert entry.is_complete() and not entry.partial.exists()
    m = entry.manifest()
    assert m["stage"] == "calibrate" and m["fingerprint"] == "abc" and m["metrics"] == {"tokens": 5.0}
    assert m["outputs"] == [{"path": "calib.bin", "bytes": 5,
                             "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}]
    assert "torch" in m["versions"] and m["started"] <= m["ended"]


def test_a_crash_mid_stage_leaves_nothing_that_looks_complete_and_resumes(tmp_path):
    entry = ArtifactStore(tmp_path).entry("quantize", "fp1")
    with pytest.raises(RuntimeError, match="boom"):
        with entry.writing() as work:
            (work.path / "block_0.safetensors").write_bytes(b"done")
            raise RuntimeError("boom")
    assert not entry.is_complete() and not entry.path.exists()
    assert (entry.partial / "block_0.safetensors").exists()
    with entry.writing() as work:
        assert work.resumed and (work.path / "block_0.safetensors").read_bytes() == b"done"
        work.finish(config={}, inputs={}, metrics={})
    assert entry.is_complete() and (entry.path / "block_0.safetensors").exists()


def test_finishing_without_manifest_is_an_error(tmp_path):
    entry = ArtifactStore(tmp_path).entry("pack", "fp")
    with pytest.raises(RuntimeError, match="without writing its manifest"):
        with entry.writing():
            pass
    assert not entry.is_complete()


def _crash_child(root: str) -> None:
    entry = ArtifactStore(Path(root)).entry("quantize", "killed")
    with entry.writing() as work:
        (work.path / "half.bin").write_bytes(b"x" * 100)
        time.sleep(60)  # killed here, like Ctrl-C or an OOM kill mid-stage


def test_killed_process_leaves_no_complete_artifact_and_releases_the_lock(tmp_path):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_crash_child, args=(str(tmp_path),))
    p.start()
    entry = ArtifactStore(tmp_path).entry("quantize", "killed")
    for _ in range(200):
        if (entry.partial / "half.bin").exists():
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert not entry.is_complete()
    with entry.writing() as work:  # the lock died with the process
        assert work.resumed
        work.finish(config={}, inputs={}, metrics={})
    assert entry.is_complete()


def _writer(root: str, tag: str, out: str) -> None:
    entry = ArtifactStore(Path(root)).entry("calibrate", "shared")
    with entry.writing() as work:
        if work is None:
            Path(out).write_text("reused")
            return
        time.sleep(0.5)
        (work.path / "who.txt").write_text(tag)
        work.finish(config={}, inputs={}, metrics={})
        Path(out).write_text("wrote")


def test_two_processes_compute_a_shared_artifact_once(tmp_path):
    ctx = mp.get_context("spawn")
    outs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "store"), t, str(o))) for t, o in zip("ab", outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert sorted(o.read_text() for o in outs) == ["reused", "wrote"]
    entry = ArtifactStore(tmp_path / "store").entry("calibrate", "shared")
    assert entry.is_complete() and (entry.path / "who.txt").read_text() in "ab"


def test_remove_and_export(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    entry = store.entry("pack", "fp")
    with entry.writing() as work:
        (work.path / "model.safetensors").write_bytes(b"weights")
        work.finish(config={}, inputs={}, metrics={})
    export_artifact(entry.path, tmp_path / "export" / "pack")
    assert (tmp_path / "export" / "pack" / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((tmp_path / "export" / "pack" / MANIFEST).read_text())["fingerprint"] == "fp"
    assert [e.fingerprint for e in store.complete_entries("pack")] == ["fp"]
    entry.remove()
    assert not entry.is_complete() and store.complete_entries("pack") == []
