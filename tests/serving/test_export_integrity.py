"""An export folder is verified as checkpoints are: the manifest's fields, its scoring sections' digest and
every file's size (always) and sha256 (``verify``, or by default for small exports)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from recsys.cli import main
from recsys.export import export_model
from recsys.serving import load
from recsys.serving.manifest import DamagedExport


def _copy(serving_run, tmp_path: Path) -> Path:
    return shutil.copytree(serving_run.export, tmp_path / "export")


def _edit_manifest(export: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((export / "manifest.json").read_text())
    edit(manifest)
    (export / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_records_size_and_sha256_of_every_file(serving_run) -> None:
    export = serving_run.export
    files = json.loads((export / "manifest.json").read_text())["files"]
    written = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(files) == written and {"model.pt", "model.onnx", "config.yaml", "vocab/C1.lookup.npy"} <= set(files)
    for name, record in files.items():
        data = (export / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert load(export).verified  # a small export: checksums compared by default


def test_damaged_model_pt_is_refused(serving_run, tmp_path: Path) -> None:
    export = _copy(serving_run, tmp_path)
    model = export / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another model (another export's model.pt of the same shape)
    model.write_bytes(bytes(data))
    with pytest.raises(DamagedExport, match=r"model.pt: sha256 differs from .*manifest.json"):
        load(export)
    assert not load(export, verify=False).verified  # sizes only: the caller chose not to hash

    model.write_bytes(bytes(data[:1000]))
    with pytest.raises(DamagedExport, match=r"model.pt holds 1000 bytes, .*manifest.json says \d+: truncated"):
        load(export, verify=False)  # sizes are compared always
    model.unlink()
    with pytest.raises(DamagedExport, match=r"model.pt is missing"):
        load(export, verify=False)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["preprocessing"].pop("ids"), r"field 'preprocessing.ids' is missing"),
        (lambda m: m.update(negative_sampling_rate="1"), r"field 'negative_sampling_rate' is a str, expected int or float"),
        (lambda m: m["features"].update(sparse="C1"), r"field 'features.sparse' is a str, expected list"),
        (lambda m: m["files"].update({"../outside": m["files"]["model.pt"]}), r"'\.\./outside', which is not a path inside"),
        (lambda m: m["preprocessing"]["schema"]["columns"].reverse(), r"differ from what `recsys export` wrote \(scoring_sha256\)"),
        (lambda m: m["preprocessing"]["schema"].update(dense_transform="none"), r"\(scoring_sha256\)"),
        (lambda m: m.update(format="recsys-export/1"), r"format 'recsys-export/1', expected 'recsys-export/2'"),
    ],
    ids=["missing-key", "wrong-type", "str-for-list", "path-outside", "columns-swapped", "dense-transform", "old-format"],
)
def test_manifest_edits_are_refused_naming_the_field(serving_run, tmp_path: Path, edit, message) -> None:
    export = _copy(serving_run, tmp_path)
    _edit_manifest(export, edit)
    with pytest.raises(DamagedExport, match=message):
        load(export)


def test_manifest_that_is_not_json_or_not_an_object(serving_run, tmp_path: Path, capsys) -> None:
    export = _copy(serving_run, tmp_path)
    (export / "manifest.json").write_text('{"format": "recsys-export/2", ')
    with pytest.raises(DamagedExport, match=r"manifest.json: not valid JSON"):
        load(export)
    (export / "manifest.json").write_text("[1, 2]")
    lines = serving_run.raw / "test.tsv"
    assert main(["predict", str(export), str(lines), "--output", str(tmp_path / "s.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: holds a JSON list, not an object" in err


def test_permuted_or_random_vocabulary_lookup_is_refused(serving_run, tmp_path: Path) -> None:
    export = _copy(serving_run, tmp_path)
    lookup = export / "vocab" / "C3.lookup.npy"
    keys, rows = np.load(lookup)
    np.save(lookup, np.stack([keys, np.random.default_rng(0).permutation(rows)]))  # same size, rows shuffled
    with pytest.raises(DamagedExport, match=r"C3.lookup.npy: sha256 differs"):
        load(export)
    size = lookup.stat().st_size
    lookup.write_bytes(np.random.default_rng(1).bytes(size))  # same size, not even an .npy
    with pytest.raises(DamagedExport, match=r"C3.lookup.npy: not a vocabulary lookup"):
        load(export, verify=False)


def test_predict_verify_flag_hashes_a_large_export(serving_run, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("recsys.serving.manifest.VERIFY_BELOW_BYTES", 0)  # every export counts as large
    export = _copy(serving_run, tmp_path)
    config = export / "config.yaml"
    config.write_text(config.read_text().replace("run_dir", "run_dxr"))  # same size, other bytes
    assert not load(export).verified
    args = ["predict", str(export), str(serving_run.raw / "test.tsv"), "--output", str(tmp_path / "s.csv"), "--no-progress"]
    assert main([*args, "--verify"]) == 2
    assert "config.yaml: sha256 differs" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


class _FullDisk(io.FileIO):
    """A file whose writes fail as on a full disk after ``room`` bytes."""

    room = 1 << 16

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_export_on_a_full_disk_is_one_line_and_leaves_no_temporary_folder(serving_run, tmp_path: Path, monkeypatch, capsys) -> None:
    # TorchScript's own writer aborted the whole process here (C++ terminate, exit 134).
    monkeypatch.setattr("recsys.export.open", lambda path, mode: _FullDisk(path, mode), raising=False)
    out = tmp_path / "export"
    config = Path(serving_run.config.training.run_dir) / "config.yaml"
    assert main(["export", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: No space left on device: free space there or choose another path" in err
    assert list(tmp_path.iterdir()) == []


def test_export_onto_a_real_full_disk(serving_run, tmp_path: Path, capsys) -> None:
    """The same on a small tmpfs (needs root to mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    files = json.loads((serving_run.export / "manifest.json").read_text())["files"]
    vocab = sum(r["bytes"] for name, r in files.items() if name.startswith("vocab/"))
    size = vocab + files["model.pt"]["bytes"] // 2  # room for the vocabulary, not for model.pt
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = mount / "export"
        config = Path(serving_run.config.training.run_dir) / "config.yaml"
        assert main(["export", str(config), "--out", str(out)]) == 2
        assert f"{out}: No space left on device" in capsys.readouterr().err
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_export_to_a_relative_path_records_its_files(serving_run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = export_model(serving_run.config, "relative/export")
    assert {"model.pt", "config.yaml"} <= set(manifest["files"])  # were none: fsspec lists absolute paths
    assert load("relative/export").verified
