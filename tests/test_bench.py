"""The benchmark: metrics on images with known answers, the judge's parser and its
real VLM path, and build -> baselines -> score end to end on a constructed build."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from sqlalchemy import select

from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.cli import build_parser
from opensubject_tasks.bench import metrics as M
from opensubject_tasks.bench.build import build_bench, held_out_videos, load_cases, select_held_out
from opensubject_tasks.bench.constructed import make_constructed_build
from opensubject_tasks.bench.judge import Judge, JudgeItem, load_rubric, parse_reply
from opensubject_tasks.bench.score import score_bench
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Clip, Pair, Sample, Subject
from opensubject_tasks.errors import BadInput
from opensubject_tasks.testmedia.samples import cutout, photo

W, H = 256, 192
BOX = [40.0, 50.0, 120.0, 130.0]


# --- constructed images -----------------------------------------------------------
def _scene(subject: str | None = "cat", box=BOX, background: str = "brick") -> np.ndarray:
    bg = cv2.resize(photo(background), (W, H), interpolation=cv2.INTER_AREA)
    if subject is None:
        return bg
    rgb, alpha = cutout(subject)
    x0, y0, x1, y1 = (int(v) for v in box)
    fg = cv2.resize(rgb, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    a = cv2.resize(alpha, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)[..., None]
    out = bg.astype(np.float32)
    out[y0:y1, x0:x1] = a * fg + (1 - a) * out[y0:y1, x0:x1]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def embedder():
    return get_backend("embedder", "classical")


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return _scene()


def test_identical_images_score_perfectly(embedder, scene):
    reference = M.crop(scene, BOX)
    sim, where = M.identity_similarity(embedder, scene, reference, BOX)
    assert sim > 0.999 and where == BOX
    region = M.box_mask(scene.shape, BOX)
    bg = M.background_consistency(scene, scene, region)
    assert bg["psnr"] == M.PSNR_CAP_DB and bg["ssim"] == pytest.approx(1.0)
    assert bg["score10"] == pytest.approx(10.0)
    assert M.similarity_score10(sim, chance=0.8) > 9.9


def test_shifted_subject_loses_identity_at_the_box_and_breaks_the_background(embedder, scene):
    reference = M.crop(scene, BOX)
    shifted_box = [BOX[0] + 120, BOX[1], BOX[2] + 120, BOX[3]]  # 1.5 box widths to the right
    shifted = _scene(box=shifted_box)
    same, _ = M.identity_similarity(embedder, scene, reference, BOX)
    moved, _ = M.identity_similarity(embedder, shifted, reference, BOX)
    assert moved < same - 0.05
    # ... while the subject is still there, where it went
    found, _ = M.identity_similarity(embedder, shifted, reference, shifted_box)
    assert found > moved + 0.05 and found > 0.98  # box corners hold other background there
    bg = M.background_consistency(shifted, scene, M.box_mask(scene.shape, BOX))
    assert bg["psnr"] < 25 and bg["ssim"] < 0.95 and bg["score10"] < 8


def test_changed_background_keeps_identity_and_gives_the_exact_psnr(embedder, scene):
    region = M.box_mask(scene.shape, BOX)
    changed = scene.astype(np.int16)
    changed[~region] = np.clip(changed[~region], 0, 245) + 10
    changed = changed.astype(np.uint8)
    keep = ~region & (scene <= 245).all(axis=-1)  # pixels that moved by exactly 10 levels
    assert M.masked_psnr(changed, scene, keep) == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-9)
    sim, _ = M.identity_similarity(embedder, changed, M.crop(scene, BOX), BOX)
    assert sim > 0.999  # the region itself is untouched
    noisy = np.clip(scene.astype(np.int16) + np.random.default_rng(0).integers(-60, 61, scene.shape),
                    0, 255).astype(np.uint8)
    noisy[region] = scene[region]
    bg = M.background_consistency(noisy, scene, region)
    assert bg["ssim"] < 0.7 and bg["score10"] < 6


def test_edits_inside_the_region_do_not_touch_the_background_score(scene):
    region = M.box_mask(scene.shape, BOX)
    edited = scene.copy()
    edited[region] = 0
    bg = M.background_consistency(edited, scene, region)
    assert bg["psnr"] == M.PSNR_CAP_DB and bg["ssim"] == pytest.approx(1.0)


def test_a_different_subject_scores_lower_identity(embedder, scene):
    reference = M.crop(scene, BOX)
    other = _scene("cup")
    same, _ = M.identity_similarity(embedder, scene, reference, BOX)
    diff, _ = M.identity_similarity(embedder, other, reference, BOX)
    assert diff < same - 0.05
    # the reference's own pixels resized still match far better than another subject
    resized = M.resize_to(reference, 60, 60)
    assert M.image_similarity(embedder, resized, reference) > diff


def test_score_maps_and_case_score():
    assert M.similarity_score10(0.8, chance=0.8) == 0.0
    assert M.similarity_score10(0.9, chance=0.8) == pytest.approx(5.0)
    assert M.similarity_score10(1.0, chance=0.8) == 10.0
    assert M.similarity_score10(0.1, chance=0.8) == 0.0
    assert M.background_score10(M.PSNR_CAP_DB, 1.0) == 10.0
    assert M.background_score10(M.PSNR_FLOOR_DB, 0.0) == 0.0
    assert M.overall(4.0, 9.0) == pytest.approx(6.0)
    assert M.overall(None, 9.0) is None and M.overall(4.0, None) is None


def test_text_image_score_needs_a_text_tower(embedder, scene):
    assert not hasattr(embedder, "embed_text")
    assert M.text_image_score(embedder, [scene], ["a cat"]) is None


# --- the judge ----------------------------------------------------------------------
@pytest.mark.parametrize("reply, score, rationale", [
    ("Score: 7\nReason: the same cat", 7.0, "the same cat"),
    ("**Score:** 6/10\n**Reason:** fur colour differs", 6.0, "fur colour differs"),
    ('{"score": 8, "reason": "close"}', 8.0, "close"),
    ("Score (0-10): 3\nReason: wrong pose", 3.0, "wrong pose"),
    ("I would give it 9/10.", 9.0, None),
    ("Score: 10\nReason: the 2 cats match", 10.0, "the 2 cats match"),
    ("0", 0.0, None),
])
def test_parser_reads_well_formed_replies(reply, score, rationale):
    parsed = parse_reply(reply)
    assert parsed.score == score and parsed.error is None
    if rationale is not None:
        assert parsed.rationale == rationale


@pytest.mark.parametrize("reply, why", [
    ("", "empty"),
    ("   \n", "empty"),
    (None, "empty"),
    ("The subject looks right.", "no score"),
    ("Score: 11\nReason: great", "outside"),
    ("-2", "outside"),
    ('{"score": 42}', "outside"),
    ('{"score": "high"}', "not a number"),
    ("Score: 7\nScore: 3", "several scores"),
    ("Somewhere between 6 and 8.", "several numbers"),
])
def test_parser_leaves_malformed_replies_unscored(reply, why):
    parsed = parse_reply(reply)
    assert parsed.score is None and why in parsed.error


def _judge_items(n: int) -> list[JudgeItem]:
    scene = _scene()
    return [JudgeItem(images={"output": scene, "reference": M.crop(scene, BOX), "input": scene},
                      fields={"prompt": "a cat on a brick wall", "category": "cat", "box": "[40, 50, 120, 130]"})
            for _ in range(n)]


def test_rubric_is_versioned_and_renders_every_axis():
    rubric = load_rubric()
    assert rubric.version
    for axis in ("prompt_adherence", "identity", "manipulation", "background"):
        text = rubric.render(axis, {"prompt": "a cat", "category": "cat", "box": "[1, 2, 3, 4]"})
        assert "Score:" in text
        assert rubric.render(axis, {"prompt": "a cat", "category": "cat", "box": "[1, 2, 3, 4]"},
                             retry=True) != text


def test_judge_with_no_vlm_is_unscored_everywhere_with_the_raw_replies():
    judge = Judge(get_backend("vlm", "none"), max_attempts=3)
    for axis in ("prompt_adherence", "identity", "manipulation", "background"):
        results = judge.score(axis, _judge_items(2))
        assert len(results) == 2
        for r in results:
            assert r.score is None and not r.scored
            assert r.raw == ["", "", ""]  # every try recorded
            assert "empty reply" in r.error and "after 3 tries" in r.error
            assert r.rubric_version == judge.rubric.version and r.judge == "none"


# --- the held-out split ------------------------------------------------------------
def test_held_out_split_is_deterministic_and_stable_as_videos_are_added():
    ids = [f"{i:032x}" for i in range(200)]
    held = select_held_out(ids, 0.2, seed=0)
    assert held == select_held_out(list(reversed(ids)), 0.2, seed=0)
    assert 20 <= len(held) <= 60
    more = select_held_out(ids + [f"{i:032x}" for i in range(200, 400)], 0.2, seed=0)
    assert held == {v for v in more if v in set(ids)}  # no video changes side
    assert select_held_out(ids, 0.2, seed=1) != held
    assert len(select_held_out(ids[:2], 0.01)) == 1 and len(select_held_out(ids[:2], 0.99)) == 1
    with pytest.raises(ValueError):
        select_held_out(ids, 1.0)


# --- end to end --------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    """An `opensubject` command through the real parser (errors raise, as with -v)."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


@pytest.fixture()
def built(tmp_path: Path):
    """An embedded build folder (database + store) holding a constructed build."""
    out = tmp_path / "out"
    out.mkdir()
    settings = load_settings(database_url=f"sqlite:///{out / 'opensubject.db'}",
                             store={"kind": "local", "local_root": str(out / "store")})
    ctx = Context.from_settings(settings)
    samples = make_constructed_build(ctx, "b1", videos=6)
    return ctx, out, samples


def _video_of(ctx: Context, sample_ids: list[str]) -> dict[str, str]:
    with session_scope(ctx.sessions) as s:
        rows = s.execute(select(Sample.id, Clip.video_id).join(Pair, Sample.pair_id == Pair.id)
                         .join(Subject, Pair.subject_id == Subject.id)
                         .join(Clip, Subject.clip_id == Clip.id)
                         .where(Sample.id.in_(sample_ids))).all()
    return dict(rows)


def test_bench_build_baselines_and_score_end_to_end(built, tmp_path):
    ctx, out, samples = built
    bench = tmp_path / "bench"
    assert _cli(["bench", "build", "--from", "b1", "--out", str(bench), "--db-out", str(out),
                 "--share", "0.5"]) == 0
    info = json.loads((bench / "bench.json").read_text())
    cases = load_cases(bench)
    held = held_out_videos(bench)
    video_of = _video_of(ctx, samples)
    all_videos = set(video_of.values())
    assert held and held < all_videos and set(info["held_out_videos"]) == held
    # every verified sample of a held-out video gives one case per task, and only those
    assert {c.video_id for c in cases} == held
    expected = {s for s, v in video_of.items() if v in held}
    for task in ("generation", "manipulation"):
        assert {c.sample_id for c in cases if c.task == task} == expected
    assert {c.scene for c in cases} == {"simple", "complex"}
    multi = [c for c in cases if c.members]
    for c in cases:  # constructed: odd videos hold two subjects, both in the target frame
        if c.task == "generation":   # OSBench's split: several subject images
            assert (c.scene == "complex") == (len(c.input_images) >= 2) == bool(c.members)
            assert c.prompt.startswith("Generate an image of the ")
        else:                        # a scene holding several subjects, one replaced
            assert (c.scene == "complex") == (c.n_subjects == 2) and len(c.input_images) == 2
            assert " of image 1 with the " in c.prompt and c.input_images[0] == c.images["input"]
    # one multi-subject case per held-out two-subject video: its subjects' generation inputs
    assert len(multi) == len({c.video_id for c in cases if c.n_subjects == 2}) >= 1
    for c in multi:
        singles = {x.subject_id: x for x in cases if x.task == "generation" and not x.members
                   and x.clip_id == c.clip_id}
        assert [m["subject_id"] for m in c.members] == sorted(singles)
        assert c.input_images == [singles[m["subject_id"]].input_images[0] for m in c.members]
        assert "from image 2 together." in c.prompt and c.images["target"] == singles[c.members[0]["subject_id"]].images["target"]
        assert (bench / c.images["target"]).exists() and c.size == [W, H]
        if c.task == "manipulation":
            region = M.box_mask((H, W), c.box)
            mask = cv2.imread(str(bench / c.images["input_mask"]), cv2.IMREAD_GRAYSCALE) > 127
            assert (region == mask).all()  # the box is the stored region's box
    assert info["splits"] == {sp: sum(c.split == sp for c in cases) for sp in info["splits"]}

    results = {}
    for name in ("copy-input", "paste-reference"):
        preds = tmp_path / name
        assert _cli(["bench", "baseline", name, "--bench", str(bench), "--out", str(preds)]) == 0
        assert sorted(p.stem for p in preds.glob("*.png")) == sorted(c.id for c in cases)
        assert _cli(["bench", "score", "--bench", str(bench), "--predictions", str(preds)]) == 0
        res = bench / "scores" / name
        results[name] = (json.loads((res / "summary.json").read_text()),
                         {c.id: json.loads((res / "cases" / f"{c.id}.json").read_text()) for c in cases})
        summary = results[name][0]
        assert summary["scorer"] == "classical" and "classical" in summary["labels"]["mode"]
        assert summary["counts"]["unscored"] == 0 and summary["counts"]["missing"] == 0
        # no VLM: every judge question was asked and left unscored, never filled in
        n_gen, n_man = (sum(c.task == t for c in cases) for t in ("generation", "manipulation"))
        assert summary["counts"]["judge_unscored"] == {"prompt_adherence": n_gen, "identity": n_gen,
                                                      "manipulation": n_man, "background": n_man}
        split_means = [summary["splits"][sp]["overall"] for sp in summary["overall_splits"]]
        assert summary["overall"] == pytest.approx(np.mean(split_means), abs=1e-3)
        assert len(summary["overall_splits"]) == 4
        rows = list(csv.DictReader(open(res / "summary.csv")))
        assert [r["group"] for r in rows][:4] == ["generation/simple", "generation/complex",
                                                 "manipulation/simple", "manipulation/complex"]
        assert "classical metrics mapped to 0-10" in (res / "summary.md").read_text()
        page = (res / "worst.html").read_text()
        assert page.count("data:image/png;base64,") >= 4 * min(20, len(cases))

    copy, copy_cases = results["copy-input"]
    paste, paste_cases = results["paste-reference"]
    for c in cases:
        cc, pc = copy_cases[c.id], paste_cases[c.id]
        assert all(r["raw"] == ["", "", ""] for r in cc["judge"].values())
        assert cc["overall"] == pytest.approx(math.sqrt(cc["pf"] * cc["sc"]), abs=1e-3)
        assert pc["classical"]["identity10"] >= 8.0  # paste-reference: high identity fidelity
        if c.task == "manipulation":
            # copy-input: perfect background consistency, empty region
            assert cc["classical"]["psnr"] == M.PSNR_CAP_DB and cc["classical"]["ssim"] == pytest.approx(1.0)
            assert cc["sc"] == pytest.approx(10.0) and cc["sc_source"] == "classical:psnr+ssim"
            assert cc["classical"]["identity10"] < 3.0
            assert pc["sc"] == pytest.approx(10.0)  # the paste stays inside the region
        else:
            assert cc["classical"]["identity10"] < pc["classical"]["identity10"] - 3
            assert cc["sc_source"] == "classical:embedding"
    # copy-input: poor identity fidelity on generation (the subject is not where the target has it)
    assert copy["tasks"]["generation"]["axes"]["identity"]["classical"] < 3.0
    assert paste["tasks"]["generation"]["sc"] > copy["tasks"]["generation"]["sc"] + 4
    assert paste["tasks"]["manipulation"]["pf"] > copy["tasks"]["manipulation"]["pf"] + 5
    assert paste["overall"] > copy["overall"]


def test_rebuild_is_identical_and_foreign_folders_are_not_overwritten(built, tmp_path):
    ctx, _, _ = built
    bench = tmp_path / "bench"
    build_bench(ctx, "b1", bench, share=0.5)
    first = (bench / "cases.jsonl").read_bytes()
    build_bench(ctx, "b1", bench, share=0.5)
    assert (bench / "cases.jsonl").read_bytes() == first
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(BadInput, match="not a bench directory"):
        build_bench(ctx, "b1", other)
    assert (other / "keep.txt").exists()
    with pytest.raises(BadInput, match="at least 2"):
        build_bench(ctx, "no-such-build", tmp_path / "empty")


def test_judge_scoring_without_a_judge_leaves_every_case_unscored(built, tmp_path):
    """scorer=judge with the "none" VLM: no PF/SC anywhere, counted, nothing invented;
    a missing prediction counts as 0 and is reported."""
    ctx, _, _ = built
    bench = tmp_path / "bench"
    build_bench(ctx, "b1", bench, share=0.5)
    cases = load_cases(bench)
    preds = tmp_path / "preds"
    from opensubject_tasks.bench.baselines import run_baseline

    run_baseline("copy-input", bench, preds)
    (preds / f"{cases[0].id}.png").unlink()
    summary = score_bench(ctx, bench, preds, tmp_path / "scores", scorer="judge", judge_attempts=1)
    assert summary["scorer"] == "judge"
    assert summary["counts"]["missing"] == 1
    assert summary["counts"]["unscored"] == len(cases) - 1
    assert summary["counts"]["scored"] == 0
    missing = json.loads((tmp_path / "scores" / "cases" / f"{cases[0].id}.json").read_text())
    assert missing["status"] == "missing" and missing["overall"] == 0.0
    one = json.loads((tmp_path / "scores" / "cases" / f"{cases[1].id}.json").read_text())
    assert one["status"] == "unscored" and one["pf"] is None and one["sc"] is None
    assert one["classical"]["identity10"] is not None  # classical metrics still ran
    assert "Unscored (" in (tmp_path / "scores" / "worst.html").read_text()


def test_score_refuses_what_is_not_a_bench(tmp_path):
    from opensubject_tasks.cli_common import CannotRun

    (tmp_path / "preds").mkdir()
    with pytest.raises(CannotRun, match="not a bench directory"):
        _cli(["bench", "score", "--bench", str(tmp_path), "--predictions", str(tmp_path / "preds")])
    with pytest.raises(CannotRun, match="holds no build"):
        _cli(["bench", "build", "--from", "x", "--out", str(tmp_path / "b"), "--db-out", str(tmp_path)])
    with pytest.raises(SystemExit):
        _cli(["bench", "baseline", "no-such-baseline", "--bench", str(tmp_path), "--out", str(tmp_path)])
    from opensubject_tasks.bench.baselines import BASELINES
    from opensubject_tasks.bench.cli import BASELINE_NAMES

    assert set(BASELINE_NAMES) == set(BASELINES)


def test_tiny_vlm_judge_through_bench_scoring(built, tmp_path):
    """A real (tiny, random) VLM as the judge: each reply is either a parsed score in
    0..10 or unscored with every raw reply kept; PF/SC come only from the judge."""
    from opensubject_tasks.bench.baselines import run_baseline
    from opensubject_tasks.bench.score import ScoringContext

    ctx, _, _ = built
    bench = tmp_path / "bench"
    build_bench(ctx, "b1", bench, share=0.5)
    lines = (bench / "cases.jsonl").read_text().splitlines()
    keep = [ln for ln in lines if '"generation"' in ln][:2] + [ln for ln in lines if '"manipulation"' in ln][:2]
    (bench / "cases.jsonl").write_text("\n".join(keep) + "\n")  # four cases keep the test short
    run_baseline("paste-reference", bench, tmp_path / "preds")
    settings = ctx.settings.model_copy(deep=True)
    settings.backends.vlm = "tiny"
    summary = score_bench(ScoringContext(settings), bench, tmp_path / "preds", tmp_path / "scores",
                          judge_attempts=2)
    assert summary["scorer"] == "judge" and summary["judge"]["backend"].startswith("tiny:vlm")
    counts = summary["counts"]
    assert counts["scored"] + counts["unscored"] == counts["cases"] and counts["missing"] == 0
    for case in load_cases(bench):
        rec = json.loads((tmp_path / "scores" / "cases" / f"{case.id}.json").read_text())
        for axis, res in rec["judge"].items():
            assert 1 <= len(res["raw"]) <= 2
            if res["score"] is None:
                assert len(res["raw"]) == 2 and res["error"]
                assert parse_reply(res["raw"][-1]).score is None  # it really was unreadable
            else:
                assert 0 <= res["score"] <= 10 and parse_reply(res["raw"][-1]).score == res["score"]
        pf_axis, sc_axis = ("prompt_adherence", "identity") if case.task == "generation" \
            else ("manipulation", "background")
        assert rec["pf"] == rec["judge"][pf_axis]["score"] and rec["sc"] == rec["judge"][sc_axis]["score"]
        assert rec["classical"]["identity10"] >= 8.0  # classical metrics ran next to the judge


def test_training_export_leaves_out_the_held_out_videos(built, tmp_path, capsys):
    """`opensubject export --exclude-bench`: no video is both trained on and benchmarked."""
    import pyarrow.parquet as pq

    from opensubject_tasks.cli import main

    ctx, out, samples = built
    bench = tmp_path / "bench"
    assert _cli(["bench", "build", "--from", "b1", "--out", str(bench), "--db-out", str(out),
                 "--share", "0.5"]) == 0
    assert f"--exclude-bench {bench}" in capsys.readouterr().out
    held = held_out_videos(bench)
    video_of = _video_of(ctx, samples)

    assert main(["export", "--build", "b1", "--out", str(out), "--dest", str(tmp_path / "all")]) == 0
    assert main(["export", "--build", "b1", "--out", str(out), "--dest", str(tmp_path / "train"),
                 "--exclude-bench", str(bench)]) == 0
    everything = pq.read_table(tmp_path / "all" / "manifest.parquet").to_pylist()
    train = pq.read_table(tmp_path / "train" / "manifest.parquet").to_pylist()
    assert {r["video_id"] for r in everything} == set(video_of.values())
    assert {r["video_id"] for r in train} == set(video_of.values()) - held
    assert sorted(r["sample_id"] for r in train) == sorted(s for s, v in video_of.items() if v not in held)
    stats = json.loads((tmp_path / "train" / "stats.json").read_text())
    assert stats["held_out"] == {"benches": [str(bench)], "videos": len(held),
                                 "samples_excluded": len(everything) - len(train)}
    assert "held_out" not in json.loads((tmp_path / "all" / "stats.json").read_text())

    # a folder that is not a bench is refused with the reason, nothing half-exported
    capsys.readouterr()
    assert main(["export", "--build", "b1", "--out", str(out), "--dest", str(tmp_path / "bad"),
                 "--exclude-bench", str(tmp_path)]) != 0
    assert "is not a bench directory" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "manifest.parquet").exists()


def test_a_rubric_may_hold_the_released_wording_verbatim_braces_and_all(tmp_path) -> None:
    """Braces that name no rubric field (a JSON reply shown in the prompt) are text."""
    from opensubject_tasks.bench.judge import fill_fields

    text = ('Instruction: "{instruction}"\nReply as JSON: {"score": <0-10>, "reasoning": "..."}\n'
            'Only {instruction} and {box} are filled; {unknown} and {} stay.')
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump({"version": "released", "format": "", "retry": "",
                                    "axes": {"prompt_following": {"images": ["output"], "prompt": text}}}))
    rubric = load_rubric(path)
    out = rubric.render("prompt_following", {"instruction": "add a hat", "box": [1, 2, 3, 4]})
    assert out.startswith('Instruction: "add a hat"\nReply as JSON: {"score": <0-10>, "reasoning": "..."}')
    assert "Only add a hat and [1, 2, 3, 4] are filled; {unknown} and {} stay." in out
    with pytest.raises(KeyError):
        fill_fields("{category}", {})
