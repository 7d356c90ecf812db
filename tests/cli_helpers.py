"""Helpers of the command-line tests: the command, a folder of some sample videos, the
status document, the hashes of an exported dataset."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

OPENSUBJECT = [sys.executable, "-m", "opensubject_tasks.cli"]


def subset(sample_media: Path, dest: Path, n: int) -> Path:
    """A folder with the first n sample videos (the run takes folders)."""
    gt = json.loads((sample_media / "ground_truth.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    good = [v for v in gt["videos"] if not v.get("bad")]
    for v in good[:n]:
        shutil.copy(sample_media / v["file"], dest / v["file"])
    return dest


def dataset_digest(out: Path) -> dict[str, str]:
    """Hashes of every exported file that must not depend on timing."""
    ds = out / "dataset"
    skip = {"stats.json", "report.html"}  # carry throughput/timestamps
    root = str(ds.resolve()).encode()     # the OmniGen2 records hold the folder's absolute path
    return {str(p.relative_to(ds)): hashlib.sha256(p.read_bytes().replace(root, b"<root>")).hexdigest()
            for p in sorted(ds.rglob("*")) if p.is_file() and p.name not in skip}


def status(out: Path) -> dict:
    proc = subprocess.run([*OPENSUBJECT, "status", "--out", str(out), "--json"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)
