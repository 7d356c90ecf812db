"""Stage 5: WebDataset shards, Parquet manifest, stats, HTML report and the OmniGen2
layout, from db rows and store objects of constructed samples."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from pydantic import SecretStr
from verify_fixtures import add_sample, add_video, make_images, prepare_db

from opensubject_tasks.config import ExportSettings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import ExportShard, Sample
from opensubject_tasks.export.service import export_build_to
from opensubject_tasks.export.shards import ShardWriter, member_size, sample_key, tar_size
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.storage import Keys

SECRET = "s3cr3t-Vb8qZ2xLw"
SHARD_NAMES = ("reference", "mask", "generation_input", "generation_mask", "manipulation_input",
               "manipulation_mask", "target")


@pytest.fixture()
def built(embedded_settings) -> tuple[Context, dict[str, str]]:
    return _build(embedded_settings)


def _build(settings) -> tuple[Context, dict[str, str]]:  # noqa: ANN001
    """Build b1: two videos (one with a rejected clip, one whose name holds a secret),
    three samples that verify, one that is rejected."""
    settings.store.access_key, settings.store.secret_key = SecretStr("AKIDEXAMPLE"), SecretStr(SECRET)
    settings.export = ExportSettings(shard_max_samples=2, report_grid=2, report_worst=2)
    assert SECRET in settings.secrets()
    ctx = Context.from_settings(settings)
    prepare_db(ctx)
    v1, c1 = add_video(ctx, "garden walk.mp4", clip_rejected=True)
    v2, c2 = add_video(ctx, f"leak-{SECRET}.mp4")
    ids = {
        "a": add_sample(ctx, v1, c1, 0, make_images(scene="brick")),
        "b": add_sample(ctx, v1, c1, 1, make_images(scene="hubble")),
        "c": add_sample(ctx, v2, c2, 0, make_images(scene="grass")),
        "bad": add_sample(ctx, v2, c2, 1, make_images(generation_subject="rocket")),
    }
    ctx.settings.verify.max_attempts = 1
    for sid in ids.values():
        run_stage(ctx, "verify", sid)
    ctx.settings.verify.max_attempts = 3
    with session_scope(ctx.sessions) as s:
        states = {k: s.get(Sample, sid).state for k, sid in ids.items()}
    assert states == {"a": "verified", "b": "verified", "c": "verified", "bad": "rejected"}
    return ctx, ids


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_writes_a_loadable_dataset(built, tmp_path: Path) -> None:
    ctx, ids = built
    out = tmp_path / "dataset"
    res = export_build_to(ctx, "b1", out)
    verified = sorted(ids[k] for k in ("a", "b", "c"))
    assert res.samples == 3 and res.shards == ["shard-000000.tar", "shard-000001.tar"]

    # WebDataset shards: every member present, grouped per sample, read by the library.
    urls = [str(out / s) for s in res.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in got] == [sample_key(i) for i in verified]
    for s in got:
        for name in SHARD_NAMES:
            img = s[f"{name}.png"]
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[0] > 0
        meta = s["json"]
        assert meta["id"] in verified and meta["captions"]["source"] == "template"
        assert meta["captions"]["short"] and meta["captions"]["long"]
        assert meta["boxes"]["target"] == [120.0, 110.0, 230.0, 210.0]
        assert meta["scores"]["verify"]["identity"] >= 0.9
        lin = meta["lineage"]
        assert lin["frames"] == {"reference": 0, "target": 40}
        assert lin["attempts"] == [{"attempt": 1, "seed": lin["seed"], "passed": True, "reasons": []}]
        assert lin["backends"]["sample"]["verifier"].startswith("classical")
        assert lin["backends"]["mining"] == {"detector": "classical"}
        assert "numpy" in lin["versions"] and lin["video"]["name"].endswith(".mp4")
    with tarfile.open(out / res.shards[0]) as tf:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tf.getmembers()} == {(0, 0, 0, "")}

    # Parquet manifest.
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["sample_id"] for r in table] == verified
    assert [r["shard"] for r in table] == ["shard-000000.tar", "shard-000000.tar", "shard-000001.tar"]
    assert all(r["caption_short"] and r["identity"] >= 0.9 for r in table)

    # OmniGen2 layout: what the trainer reads (tested in depth below).
    og = json.loads((out / "stats.json").read_text())["export"]["omnigen2"]
    # a and b: two subjects of one clip sharing the target frame -> one 2-subject record
    assert (og["generation_single"], og["generation_multi"], og["manipulation"]) == (3, 1, 3)
    assert og["generation_multi_by_subjects"] == {"2": 1} and og["paths"] == "absolute"
    multi = {r["sample_id"]: r["multi_subject_key"] for r in table}
    assert multi[ids["a"]] == multi[ids["b"]] is not None and multi[ids["c"]] is None
    assert all(r["generation_instruction"].startswith("Generate an image of the ") for r in table)
    assert all(r["manipulation_instruction"].startswith("Replace the ") for r in table)

    # Stats: the funnel counts what was built.
    stats = json.loads((out / "stats.json").read_text())
    assert stats["funnel"] == {"inputs": 2, "duplicates": 0, "videos": 2, "curated": 2, "clips": 2,
                               "subjects": 4, "pairs": 4, "samples": 4, "verified": 3, "rejected": 1}
    assert stats["states"]["clips"] == {"mined": 2, "rejected": 1}
    by_stage = {(r["stage"], r["reason"].split(":")[0]): r["count"] for r in stats["rejections"]}
    assert by_stage[("clip", "clip shorter than # s (# s)")] == 1
    assert by_stage[("sample", "identity")] >= 1
    assert stats["verification"]["verified_at_attempt"] == {"1": 3}
    assert stats["verification"]["failed_checks"]["identity"] >= 1
    assert stats["throughput"]["verify"]["attempts"] == 4 and stats["throughput"]["verify"]["entities"] == 4
    assert stats["export"]["samples"] == 3 and stats["export"]["shards"] == 2

    # Report: self-contained, shows the funnel, and no secret.
    html = (out / "report.html").read_text()
    assert '<svg xmlns="http://www.w3.org/2000/svg" id="funnel"' in html
    assert 'data-step="verified" data-count="3"' in html and 'data-step="rejected" data-count="1"' in html
    assert html.count('class="card"') == 4                  # 2 random + 2 worst
    assert "data:image/jpeg;base64," in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert "identity" in html and "clip shorter than" in html
    # single- and multi-subject samples counted apart
    assert '<table class="training">' in html and "<td>generation multi</td><td>1</td>" in html
    assert "<td>generation single</td><td>3</td>" in html and "<td>generation with 2 subjects</td><td>1</td>" in html
    assert SECRET not in html and "[redacted]" in html
    assert SECRET not in (out / "stats.json").read_text()
    # every file is counted, the sink's temporary folder is gone
    assert res.files == len(_files(out)) and not (out / ".tmp").exists()


def _portable(files: dict[str, bytes], root: Path) -> dict[str, bytes]:
    """An export's files with its own absolute root (in the OmniGen2 records) blanked."""
    return {k: v.replace(str(root.resolve()).encode(), b"<root>") for k, v in files.items()}


def test_reexport_is_byte_identical_and_both_sinks_agree(built, tmp_path: Path) -> None:
    ctx, _ = built
    first, second = tmp_path / "one", tmp_path / "two"
    export_build_to(ctx, "b1", first)
    before = _files(first)
    export_build_to(ctx, "b1", first)            # again into the same folder
    export_build_to(ctx, "b1", second)           # and into a fresh one
    assert _files(first) == before
    assert _portable(_files(second), second) == _portable(before, first)
    assert b"<root>/Images/" in _portable(before, first)["omnigen2/jsonl/generation/part-000000.jsonl"]

    # The distributed stages (plan, one task per part, finish) write the same files into the
    # store under datasets/<build>/; there the OmniGen2 records are relative (no folder is
    # known) and stats/report say so.
    parts = run_stage(ctx, "export_plan", "b1").details["parts"]
    assert parts == ["b1#000000-000000", "b1#000001-000001"]  # 3 samples, 2 per shard: a part each
    assert all(run_stage(ctx, "export_part", p).status == "ok" for p in parts)
    res = run_stage(ctx, "export", "b1")
    assert res.status == "ok" and res.details["samples"] == 3
    prefix = Keys.dataset("b1", "x")[:-1]
    stored = {o.key[len(prefix):]: ctx.store.get_bytes(o.key) for o in ctx.store.list(prefix)}
    layout = {"stats.json", "report.html"} | {k for k in before if k.startswith("omnigen2/")}
    assert set(stored) == set(before)
    assert {k: v for k, v in stored.items() if k not in layout} == {k: v for k, v in before.items() if k not in layout}
    assert b'"output_image":"Images/generation/output_images/' in stored["omnigen2/jsonl/generation/part-000000.jsonl"]
    og = json.loads(stored["stats.json"])["export"]["omnigen2"]
    assert og["paths"] == "relative" and "export.omnigen2_root" in og["note"]
    assert "export.omnigen2_root" in stored["report.html"].decode()
    # The export's own stage attempt does not change the next export.
    export_build_to(ctx, "b1", second)
    assert _portable(_files(second), second) == _portable(before, first)


def test_reexport_after_a_change_removes_stale_files(built, tmp_path: Path) -> None:
    ctx, ids = built
    out = tmp_path / "dataset"
    (out / "notes.txt").parent.mkdir(parents=True)
    (out / "notes.txt").write_text("not ours")
    export_build_to(ctx, "b1", out)
    old = _files(out)
    (out / ".shard-x1.tar.part").write_bytes(b"left by an interrupted export")
    with session_scope(ctx.sessions) as s:
        s.get(Sample, ids["c"]).state = "rejected"
    res = export_build_to(ctx, "b1", out)
    key = sample_key(ids["c"])
    assert res.samples == 2 and res.shards == ["shard-000000.tar"]
    gone = sorted(set(old) - set(_files(out)))
    # shard 1 (c alone): its tar, manifest part, two JSONL parts and its three images
    # (generation input, scene, target; a shard holds the images its records use)
    assert gone == sorted(["shard-000001.tar", "parts/shard-000001.parquet",
                           "omnigen2/jsonl/generation/part-000001.jsonl",
                           "omnigen2/jsonl/manipulation/part-000001.jsonl",
                           *(rel for rel in old if rel.startswith("Images/") and "/000001/" in rel)])
    assert res.removed == len(gone) == 7
    assert not list((out / "Images").glob("*/*/000001"))     # emptied image folders go too
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert key not in {r["key"] for r in manifest}
    assert (out / "notes.txt").read_text() == "not ours"          # files not ours are kept
    assert not (out / ".shard-x1.tar.part").exists()


def test_unknown_build_is_a_clear_error(built, tmp_path: Path) -> None:
    ctx, _ = built
    res = run_stage(ctx, "export", "nope")
    assert res.status == "failed" and "build 'nope' not found" in res.reason


def _write_shards(limit: int) -> tuple[dict[str, bytes], dict[str, list[int]]]:
    shards: dict[str, bytes] = {}
    content: dict[str, list[int]] = {}
    writer = ShardWriter(lambda name, path: shards.__setitem__(name, path.read_bytes()), limit, 1000)
    rng = np.random.default_rng(0)
    sizes = [int(x) for x in rng.integers(1_000, 30_000, 20)] + [100_000]   # the last exceeds the limit
    for i, n in enumerate(sizes):
        members = [(f"s{i:03d}.bin", rng.bytes(n)), (f"s{i:03d}.json", b"{}")]
        name = writer.add(members)
        content.setdefault(name, []).append(sum(member_size(m, len(d)) for m, d in members))
    writer.finish()
    return shards, content


def test_shards_are_size_bounded_and_deterministic() -> None:
    limit = 64 * 1024
    shards, content = _write_shards(limit)
    assert sorted(shards) == sorted(content) and len(shards) > 3
    for name, data in shards.items():
        assert len(data) == tar_size(sum(content[name]))    # the size accounting is exact
        assert len(data) <= limit or len(content[name]) == 1  # only a lone oversized sample exceeds it
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            assert len(tf.getnames()) == 2 * len(content[name])
    assert sum(len(v) for v in content.values()) == 21
    again, _ = _write_shards(limit)
    assert again == shards


def test_postgresql_export_equals_sqlite_export(built, embedded_settings, pg_db, tmp_path: Path) -> None:
    """The same build on the production database exports the same dataset."""
    ctx, _ = built
    export_build_to(ctx, "b1", tmp_path / "sqlite")
    pg_settings = embedded_settings.model_copy(deep=True)
    pg_settings.database_url = pg_db
    pg_settings.store.local_root = tmp_path / "pg-store"
    pg_ctx, _ = _build(pg_settings)
    export_build_to(pg_ctx, "b1", tmp_path / "pg")
    timing = {"stats.json", "report.html"}    # stage durations differ between the two runs
    a = {k: v for k, v in _portable(_files(tmp_path / "sqlite"), tmp_path / "sqlite").items() if k not in timing}
    b = {k: v for k, v in _portable(_files(tmp_path / "pg"), tmp_path / "pg").items() if k not in timing}
    assert a == b and len(a) > 10
    sa = json.loads((tmp_path / "sqlite" / "stats.json").read_text())
    sb = json.loads((tmp_path / "pg" / "stats.json").read_text())
    assert sa["funnel"] == sb["funnel"] and sa["rejections"] == sb["rejections"]
    pg_ctx.engine.dispose()


def _omnigen2_load(config: Path, cache: Path) -> list[dict]:
    """What OmniGen2's training dataset does with a data config (omnigen2/dataset/
    omnigen2_train_dataset.py, `_collect_annotations`): every `data` entry needs path
    and ratio (it sums the ratios, and the resampled copies it makes with them are
    dropped: every record of every entry is used once); a folder means every *.jsonl /
    *.json under it; each is loaded with `datasets`; then every input and output image
    is opened with PIL exactly as the record writes it."""
    import glob
    import os

    import yaml
    from datasets import load_dataset

    entries = yaml.load(config.read_text(), Loader=yaml.FullLoader)["data"]
    rows = []
    for entry in entries:
        assert {"path", "type", "ratio"} <= set(entry) and float(entry["ratio"]) > 0
        path = entry["path"]
        files = (glob.glob(os.path.join(path, "**/*.jsonl"), recursive=True)
                 + glob.glob(os.path.join(path, "**/*.json"), recursive=True)) if os.path.isdir(path) else path
        rows += list(load_dataset("json", data_files=files, cache_dir=str(cache))["train"])
    for row in rows:
        assert set(row) == {"task_type", "instruction", "input_images", "output_image"}
        for image in [*row["input_images"], row["output_image"]]:
            Image.open(image).convert("RGB")          # as OmniGen2's process_item opens them
    return rows


def test_omnigen2_layout_loads_from_any_working_directory(built, tmp_path: Path, monkeypatch) -> None:
    ctx, ids = built
    out = tmp_path / "dataset"
    export_build_to(ctx, "b1", out)
    elsewhere = tmp_path / "trainer"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                      # a trainer that runs in its own folder
    config = out / "omnigen2" / "data.yml"
    rows = _omnigen2_load(config, tmp_path / "hf-cache")
    by_task = {t: [r for r in rows if r["task_type"] == t] for t in ("ic", "edit")}
    assert len(by_task["ic"]) == 4 and len(by_task["edit"]) == 3    # 3 single + 1 two-subject record
    assert all(Path(p).is_absolute() for r in rows for p in [*r["input_images"], r["output_image"]])
    multi = [r for r in by_task["ic"] if len(r["input_images"]) == 2]
    assert len(multi) == 1 and "from image 1 and the " in multi[0]["instruction"] \
        and "from image 2 together" in multi[0]["instruction"]
    for r in by_task["edit"]:    # the scene, then the subject image of the sample's generation record
        assert len(r["input_images"]) == 2 and r["output_image"] in {g["output_image"] for g in by_task["ic"]}
        assert r["input_images"][1] in {g["input_images"][0] for g in by_task["ic"]}
        assert " of image 1 with the " in r["instruction"] and " from image 2." in r["instruction"]
    # pointed at the JSONL folder instead, OmniGen2 globs it: nothing else (stats.json) is there
    folder = tmp_path / "folder.yml"
    folder.write_text(f"data:\n  - path: {out / 'omnigen2' / 'jsonl'}\n    type: ic\n    ratio: 1.0\n")
    assert len(_omnigen2_load(folder, tmp_path / "hf-cache")) == len(rows)
    # within a shard no image is stored twice: 3 samples x 3 roles, but the three
    # constructed generation inputs are the same bytes (a and b share shard 0, c is in 1)
    images = [p for p in (out / "Images").rglob("*") if p.is_file()]
    assert len(images) == 8 and len({p.read_bytes() for p in images}) == 7
    assert {p.parent.name for p in images} == {"000000", "000001"}   # a folder per shard


def test_export_is_readable_by_other_users_whatever_the_umask(built, tmp_path: Path) -> None:
    import os
    import stat

    ctx, _ = built
    out = tmp_path / "new" / "nested" / "dataset"
    old = os.umask(0o077)               # a strict umask: files 0600, folders 0700 by default
    try:
        export_build_to(ctx, "b1", out)
        export_build_to(ctx, "b1", out)   # a re-export into the existing folder too
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*"), out.parent, out.parent.parent]}
    files = {p: m for p, m in modes.items() if p.is_file()}
    assert len(files) >= 15 and set(files.values()) == {0o644}   # shards, images, layout, manifest...
    assert {m for p, m in modes.items() if p.is_dir()} == {0o755}


def test_parts_write_their_own_parts_and_the_finish_lists_nothing(built, monkeypatch) -> None:
    """The distributed export: each part writes its shard's manifest part and JSONL parts;
    the finish merges them and, after a change, removes the files of shards no longer
    planned, all without listing the store."""
    ctx, ids = built
    prefix = Keys.dataset("b1", "x")[:-1]

    lists: list[str] = []
    real_list = ctx.store.list

    def stored() -> dict[str, bytes]:   # the test's own look, not counted
        return {o.key[len(prefix):]: ctx.store.get_bytes(o.key) for o in real_list(prefix)}

    monkeypatch.setattr(ctx.store, "list", lambda p="": (lists.append(p), real_list(p))[1])

    def export() -> dict:
        parts = run_stage(ctx, "export_plan", "b1").details["parts"]
        assert all(run_stage(ctx, "export_part", p).status == "ok" for p in parts)
        before_finish = set(stored())
        res = run_stage(ctx, "export", "b1")
        assert res.status == "ok", res.reason
        return {"parts": parts, "before_finish": before_finish, "details": res.details}

    first = export()
    assert first["parts"] == ["b1#000000-000000", "b1#000001-000001"]
    # the parts wrote their own manifest and JSONL parts; the merged manifest is the finish's
    assert {"parts/shard-000000.parquet", "parts/shard-000001.parquet",
            "omnigen2/jsonl/generation/part-000000.jsonl", "omnigen2/jsonl/generation/part-000001.jsonl",
            "omnigen2/jsonl/manipulation/part-000000.jsonl", "omnigen2/jsonl/manipulation/part-000001.jsonl",
            "omnigen2/jsonl/generation_multi_subject/part-000000.jsonl"} <= first["before_finish"]
    assert "manifest.parquet" not in first["before_finish"] and "omnigen2/data.yml" not in first["before_finish"]
    files = stored()
    part_rows = [pq.read_table(io.BytesIO(files[f"parts/shard-{k:06d}.parquet"])).to_pylist() for k in (0, 1)]
    assert [[r["sample_id"] for r in rows] for rows in part_rows] == [sorted([ids["a"], ids["b"]]), [ids["c"]]]
    assert pq.read_table(io.BytesIO(files["manifest.parquet"])).to_pylist() == part_rows[0] + part_rows[1]
    assert b"generation_multi_subject" in files["omnigen2/data.yml"]
    assert lists == []                                   # nothing listed the store

    # c is rejected: the plan has one shard left, the finish removes shard 1's files
    with session_scope(ctx.sessions) as s:
        s.get(Sample, ids["c"]).state = "rejected"
    parts = run_stage(ctx, "export_plan", "b1").details["parts"]
    with session_scope(ctx.sessions) as s:   # the dropped shard stays recorded, with no samples
        assert [(x.shard, x.samples) for x in s.query(ExportShard).order_by(ExportShard.shard)] == [(0, 2), (1, 0)]
    assert parts == ["b1#000000-000000"] and run_stage(ctx, "export_part", parts[0]).status == "ok"
    res = run_stage(ctx, "export", "b1")
    assert res.status == "ok" and res.details["samples"] == 2
    after = stored()
    shard1 = {k for k in files if "000001" in k}
    assert len(shard1) == 7 and res.details["removed"] == 7   # tar, manifest part, 2 JSONL parts, 3 images
    assert set(after) == set(files) - shard1
    with session_scope(ctx.sessions) as s:
        assert [x.shard for x in s.query(ExportShard)] == [0]
    assert lists == []
