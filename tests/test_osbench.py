"""The released OSBench format and its scorer's protocol: a small benchmark saved with
`datasets` (4 task types, English and Chinese instructions) is imported, a copy-input
baseline is written in the released `fullset/<task_type>/<key>.png` layout and scored
under `--protocol osbench`, by a scripted judge (known replies: the figures are checked
against a hand computation) and by the tiny random VLM (the real model path)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pytest
from PIL import Image

from opensubject_tasks.backends.registry import register
from opensubject_tasks.cli import build_parser
from opensubject_tasks.bench.baselines import run_baseline
from opensubject_tasks.bench.build import load_cases
from opensubject_tasks.bench.osbench import parse_json_reply, scorer_size
from opensubject_tasks.config import load_settings
from opensubject_tasks.testmedia.samples import photo

TASK_TYPES = ("single_subject_generation", "multiple_subject_generation",
              "single_subject_manipulation", "multiple_subject_manipulation")
N_INPUTS = {"single_subject_generation": 1, "multiple_subject_generation": 3,
            "single_subject_manipulation": 2, "multiple_subject_manipulation": 2}


def _image(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(cv2.resize(photo(name), size, interpolation=cv2.INTER_AREA))


def _osbench(path: Path) -> list[dict[str, Any]]:
    """12 English cases (3 per task type) and 4 Chinese ones, saved as the release is."""
    import datasets

    rows = []
    names = ["coffee", "chelsea", "astronaut", "rocket", "brick", "moon"]
    for t, task_type in enumerate(TASK_TYPES):
        for k in range(4):
            idx = 4 * t + k
            truth = np.asarray(_image(names[(t + k + 3) % 6], (512, 384))).copy()
            truth[:64, :64] = idx * STEP      # a flat patch that tells the scripted judge the case
            lang = "zh" if k == 3 else "en"
            text = f"Put subject {k} into scene {t} near the window" if lang == "en" else f"把主体{k}放进场景{t}"
            big = (1400, 1000) if k == 0 else (320, 240)      # one input above the 1024x1024 bound
            inputs = [_image(names[(t + k + i) % 6], big if i == 0 else (200, 160)) for i in range(N_INPUTS[task_type])]
            rows.append({"key": f"case{t}{k}", "task_type": task_type, "instruction": text,
                         "instruction_language": lang, "input_images": inputs,
                         "output_image": Image.fromarray(truth), "idx": idx})
    features = datasets.Features({"key": datasets.Value("string"), "task_type": datasets.Value("string"),
                                  "instruction": datasets.Value("string"),
                                  "instruction_language": datasets.Value("string"),
                                  "input_images": datasets.List(datasets.Image()),
                                  "output_image": datasets.Image()})
    datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "idx"} for r in rows],
                               features=features).save_to_disk(str(path))
    return rows


# --- a scripted judge: replies that are known in advance ----------------------------
SEEN: list[tuple[int, str]] = []   # (number of images, prompt) of every question
CHAT: list[dict[str, Any]] = []    # the settings each batch was asked with
PF_MARKS = ("fulfills the **instruction**", "**manipulated or integrated**")   # the two PF rubrics


def is_pf(prompt: str) -> bool:
    return any(m in prompt for m in PF_MARKS)


STEP = 15   # patch grey level per case index


def scripted_score(idx: int, kind: str) -> int | None:
    """The score the scripted judge gives case ``idx`` (None: an unreadable reply)."""
    if idx == 6 and kind == "pf":
        return None
    h = hashlib.sha256(f"{kind}:{idx}".encode()).digest()
    return h[0] % 11


class ScriptedJudge:
    """Reads which case it is shown from the ground truth's patch (the second-to-last
    image, as the released scorer sends it) and replies with that case's known score."""

    name = "scripted-judge"

    def answer(self, images: Sequence[Sequence[np.ndarray]], prompts: Sequence[str], **chat: Any) -> list[str]:
        CHAT.append(chat)
        out = []
        for imgs, prompt in zip(images, prompts, strict=True):
            SEEN.append((len(imgs), prompt))
            idx = round(float(imgs[-2][8:56, 8:56].mean()) / STEP)
            kind = "pf" if is_pf(prompt) else "sc"
            score = scripted_score(idx, kind)
            out.append("I cannot tell." if score is None else
                       f'Here is my rating: {{"score": {score}, "reasoning": "scripted"}}')
        return out


@register("vlm", "scripted-judge")
def _make_scripted(**_: Any) -> ScriptedJudge:
    return ScriptedJudge()


def _cli(argv: list[str]) -> int:
    """An `opensubject` command through the real parser (errors raise, as with -v)."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


@pytest.fixture(scope="module")
def imported_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The released layout imported, and copy-input predictions laid out as the released
    inference writes them: made once per module (tests get copies, ``imported``)."""
    tmp = tmp_path_factory.mktemp("osbench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(tmp / "hf-cache"))
        rows = _osbench(tmp / "osbench")
        bench = tmp / "bench"
        assert _cli(["bench", "import-osbench", str(tmp / "osbench"), "--out", str(bench)]) == 0
        flat = tmp / "flat"
        run_baseline("copy-input", bench, flat)
        results = tmp / "results"
        for case in load_cases(bench):
            dest = results / "fullset" / case.task_type / f"{case.key}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(flat / f"{case.id}.png", dest)
    return tmp, rows


@pytest.fixture()
def imported(imported_once, tmp_path: Path) -> tuple[Path, list[dict[str, Any]], Path]:
    """A copy of the imported bench and its predictions (tests change both)."""
    made, rows = imported_once
    for name in ("bench", "results"):
        shutil.copytree(made / name, tmp_path / name)
    return tmp_path / "bench", rows, tmp_path / "results"


def test_import_keeps_english_cases_in_the_released_task_types(imported) -> None:
    bench, rows, _ = imported
    cases = load_cases(bench)
    english = [r for r in rows if r["instruction_language"] == "en"]
    assert len(cases) == len(english) == 12
    info = json.loads((bench / "bench.json").read_text())
    assert info["skipped_other_languages"] == {"zh": 4} and info["task_types"] == {t: 3 for t in TASK_TYPES}
    for case, row in zip(sorted(cases, key=lambda c: c.key), sorted(english, key=lambda r: r["key"]), strict=True):
        assert (case.key, case.task_type, case.prompt) == (row["key"], row["task_type"], row["instruction"])
        assert len(case.input_images) == len(row["input_images"]) and case.box is None
        assert case.task == ("manipulation" if "manipulation" in case.task_type else "generation")
        assert case.scene == ("simple" if "single" in case.task_type else "complex")
        target = np.asarray(Image.open(bench / case.images["target"]))
        assert np.array_equal(target, np.asarray(row["output_image"].convert("RGB")))
        assert case.instruction_language == "en"


def test_scored_as_the_released_scorer_and_checked_by_hand(imported, tmp_path: Path) -> None:
    bench, rows, results = imported
    english = {r["key"]: r for r in rows if r["instruction_language"] == "en"}
    # one prediction missing: skipped by default (as released), or 0 when asked
    missing_key = "case01"
    (results / "fullset" / "single_subject_generation" / f"{missing_key}.png").unlink()
    settings = load_settings(backends={"vlm": "scripted-judge"})
    from opensubject_tasks.bench.score import ScoringContext, score_bench

    SEEN.clear()
    CHAT.clear()
    summary = score_bench(ScoringContext(settings), bench, results, tmp_path / "s1", protocol="osbench",
                          judge_attempts=2)

    # by hand: per task type the mean of sqrt(PF * SC) over cases with both scores
    expected: dict[str, dict[str, float]] = {}
    for tt in TASK_TYPES:
        pfs, scs, overall = [], [], []
        for key, r in english.items():
            if r["task_type"] != tt or key == missing_key:
                continue
            pf, sc = scripted_score(r["idx"], "pf"), scripted_score(r["idx"], "sc")
            if pf is None or sc is None:
                continue
            pfs.append(pf)
            scs.append(sc)
            overall.append(math.sqrt(pf * sc))
        expected[tt] = {"pf": np.mean(pfs), "sc": np.mean(scs), "overall": np.mean(overall)}
    for tt in TASK_TYPES:
        got = summary["task_types"][tt]
        for k in ("pf", "sc", "overall"):
            assert got[k] == pytest.approx(expected[tt][k], abs=1e-4), (tt, k)
    assert summary["overall"] == pytest.approx(np.mean([e["overall"] for e in expected.values()]), abs=1e-4)
    assert summary["pf"] == pytest.approx(np.mean([e["pf"] for e in expected.values()]), abs=1e-4)
    c = summary["counts"]
    assert (c["cases"], c["missing"], c["unscored"], c["scored"]) == (12, 1, 1, 10)
    unread = json.loads((tmp_path / "s1" / "cases" / "multiple_subject_generation-case12.json").read_text())
    assert english["case12"]["idx"] == 6
    assert unread["status"] == "unscored" and unread["pf"] is None
    assert unread["judge"]["prompt_following"]["raw"] == ["I cannot tell.", "I cannot tell."]   # retried, kept
    # a retry is the same prompt again (no reminder), as released
    asked = [p for _, p in SEEN if english["case12"]["instruction"] in p and "fulfills the **instruction**" in p]
    assert len(asked) == 2 and asked[0] == asked[1]
    # every question went as the released request: text first, no system line, 1400 tokens
    assert CHAT and all(c == {"max_new_tokens": 1400, "system": False, "text_first": True} for c in CHAT)

    # the images the judge saw, in the released scorer's order and number
    gen_pf = [n for n, p in SEEN if PF_MARKS[0] in p]
    man_pf = [n for n, p in SEEN if PF_MARKS[1] in p]
    sc = [n for n, p in SEEN if not is_pf(p)]
    assert sorted(set(gen_pf)) == [1 + 2, 3 + 2]       # every input, the ground truth, the output
    assert set(man_pf) == {2} and set(sc) == {2}        # ground truth and output only

    zero = score_bench(ScoringContext(settings), bench, results, tmp_path / "s2", protocol="osbench",
                       judge_attempts=1, missing="zero")
    rest = [math.sqrt(scripted_score(english[k]["idx"], "pf") * scripted_score(english[k]["idx"], "sc"))
            for k in english if english[k]["task_type"] == "single_subject_generation" and k != missing_key]
    assert zero["task_types"]["single_subject_generation"]["overall"] == pytest.approx(
        np.mean([*rest, 0.0]), abs=1e-4)


def test_judge_images_are_sized_and_ordered_as_released(imported) -> None:
    from opensubject_tasks.bench.osbench import judge_images

    bench, _, results = imported
    case = next(c for c in load_cases(bench) if c.key == "case10")    # 3 inputs, the first 1400x1000
    pred = results / "fullset" / case.task_type / f"{case.key}.png"
    imgs = judge_images(bench, case, pred)
    # sqrt(1024*1024 / (1400*1000)) = 0.8654: 1211 x 865, down to multiples of 16
    assert scorer_size((1400, 1000)) == (1200, 864) and scorer_size((200, 160)) == (192, 160)
    first = imgs["inputs"][0]
    assert first.shape[:2][::-1] == scorer_size((1400, 1000))          # scaled to 1024x1024 of area
    assert imgs["output"].shape == first.shape                          # the output follows input 1
    assert imgs["ground_truth"].shape == (384, 512, 3)                  # the ground truth as it is


@pytest.mark.parametrize("reply, score", [
    ('{"score": 7, "reasoning": "fine"}', 7.0), ('Sure.\n{"score": 0,\n "reasoning": "no"}', 0.0), ("10", 10.0),
    ('{"score": 11}', None), ('{"reasoning": "x"}', None), ("Score: 7", None), ("", None), ('{"score": "7"}', None),
])
def test_json_replies(reply: str, score: float | None) -> None:
    assert parse_json_reply(reply).score == score


def test_tiny_vlm_judge_under_the_osbench_protocol(imported, tmp_path: Path) -> None:
    """The real model path: each reply is a parsed score or unscored with every raw reply
    kept; the summary counts exactly those."""
    from opensubject_tasks.bench.score import ScoringContext, score_bench

    bench, _, results = imported
    lines = (bench / "cases.jsonl").read_text().splitlines()
    (bench / "cases.jsonl").write_text("\n".join(lines[::3]) + "\n")   # 4 cases keep the test short
    settings = load_settings(backends={"vlm": "tiny"})
    # the released rubric with replies capped at 16 tokens: a random tiny model never stops
    # early, and 1400 tokens per question would only cost time here
    import yaml

    from opensubject_tasks.bench.osbench import RUBRIC_FILE
    doc = yaml.safe_load(RUBRIC_FILE.read_text())
    doc["chat"]["max_new_tokens"] = 16
    (tmp_path / "rubric.yaml").write_text(yaml.safe_dump(doc))
    summary = score_bench(ScoringContext(settings), bench, results, tmp_path / "tiny", protocol="osbench",
                          judge_attempts=2, rubric=tmp_path / "rubric.yaml")
    assert summary["judge"]["backend"].startswith("tiny:vlm") and summary["counts"]["cases"] == 4
    scored = 0
    for case in load_cases(bench):
        rec = json.loads((tmp_path / "tiny" / "cases" / f"{case.id}.json").read_text())
        for res in rec["judge"].values():
            parsed = parse_json_reply(res["raw"][-1])
            assert parsed.score == res["score"] and (res["score"] is not None or len(res["raw"]) == 2)
        scored += rec["status"] == "scored"
        assert (rec["status"] == "scored") == (rec["pf"] is not None and rec["sc"] is not None)
    assert summary["counts"]["scored"] == scored


def test_output_resized_before_its_exif_orientation_is_applied_as_released(imported, tmp_path: Path) -> None:
    """The released scorer resizes the output to the first input's size and only then
    turns it upright (load_image's exif_transpose): an output tagged 'rotate 90' arrives
    with its sides swapped and its content turned."""
    from opensubject_tasks.bench.osbench import _rgb, judge_images

    bench, _, _ = imported
    case = next(c for c in load_cases(bench) if c.key == "case10")
    w, h = scorer_size((1400, 1000))
    raw = np.zeros((300, 400, 3), np.uint8)
    raw[:60, :60] = (255, 0, 0)                         # a red corner, top left as stored
    tagged = Image.fromarray(raw)
    exif = tagged.getexif()
    exif[0x0112] = 6                                    # EXIF orientation: rotate 90 clockwise to view
    pred = tmp_path / "tagged.png"
    tagged.save(pred, exif=exif)
    out = judge_images(bench, case, pred)["output"]
    assert out.shape[:2] == (w, h)                      # resized to (w, h), then turned: h x w -> w x h
    assert out[5, -5, 0] > 200 and out[5, -5, 1] < 60   # the corner is now top right
    assert out[5, 5].max() < 60

    # an image handed over as bytes (no decoding by `datasets`) is turned upright at import
    import io
    buf = io.BytesIO()
    tagged.save(buf, format="PNG", exif=exif)
    upright = np.asarray(_rgb({"bytes": buf.getvalue()}, "test image"))
    assert upright.shape == (400, 300, 3) and upright[5, -5, 0] > 200


def _doc_differences() -> dict[str, str]:
    """Keys of the 'Remaining differences' table in docs/benchmark.md -> their row."""
    text = (Path(__file__).parents[1] / "docs" / "benchmark.md").read_text()
    section = text.split("Remaining differences from the released scorer", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = line
    return rows


def _our_protocol() -> tuple[dict[str, str], dict[str, str]]:
    """(prompts rendered for one instruction, settings) of `--protocol osbench`, read from
    the code and rubric file that run it, in the released fixture's terms."""
    import inspect

    from opensubject_tasks.bench import osbench
    from opensubject_tasks.bench.judge import load_rubric

    rubric = load_rubric(osbench.RUBRIC_FILE)
    fields = {"instruction": INSTRUCTION}
    prompts = {axis: rubric.render(axis, fields) for axis in rubric.axes}
    chat = rubric.chat
    same_retry = all(rubric.render(a, fields, retry=True) == prompts[a] for a in rubric.axes)
    one_gen_pf = [a for a in rubric.axes if a.startswith("pf_generation")] == ["pf_generation"]
    missing = inspect.signature(osbench.score_osbench).parameters["missing"].default
    settings = {
        **{f"images.{a}": ", ".join(ax.images) for a, ax in rubric.axes.items()},
        "message.order": "text, images" if chat.get("text_first") else "images, text",
        "message.system": "none" if chat.get("system") is False else "the backend's system line",
        "message.roles": "user" if chat.get("system") is False else "system, user",
        "judge.model": "the configured VLM backend",
        "judge.max_tokens": str(chat.get("max_new_tokens", "the backend's long_caption_tokens")),
        "judge.sampling": "greedy",
        "image.encoding": f"JPEG, PIL default quality ({osbench.JPEG_QUALITY})",
        "image.inputs": "scaled to 1024x1024 pixels of area if larger, each side floored to a multiple of 16, "
                        "then EXIF-transposed",
        "image.output": "converted to RGB, resized to the first input's size, then EXIF-transposed",
        "image.ground_truth": "EXIF-transposed",
        "retry.prompt": "the same prompt" if same_retry else "a format reminder",
        "retry.max_tries": str(inspect.signature(osbench.score_osbench).parameters["judge_attempts"].default),
        "retry.unit": "each of PF and SC on its own",
        "retry.exhausted": "unscored, kept and counted",
        "reply.parse": "JSON object or a bare integer; malformed JSON unreadable",
        "rubric.pf_generation": "multiple-subject prompt for every generation case" if one_gen_pf else "per case",
        "missing_prediction": "skipped" if missing == "skip" else "scored 0",
        "languages": "other languages left out at import",
    }
    return prompts, settings


INSTRUCTION = "Put the brown dog from image 1 on the red sofa from image 2."


def test_protocol_diff_against_the_released_scorer_is_what_the_docs_list() -> None:
    """Line by line, prompts and settings of `--protocol osbench` against the released
    scorer's (tests/osbench_released.py). Prompts must be identical; every setting that
    differs must have its row in docs/benchmark.md, and every row there must differ."""
    import difflib

    import osbench_released as released

    ours, settings = _our_protocol()
    assert set(ours) == set(released.PROMPTS)
    for axis, text in released.PROMPTS.items():
        theirs = text.replace(released.PLACEHOLDER, INSTRUCTION)
        diff = list(difflib.unified_diff(theirs.splitlines(keepends=True), ours[axis].splitlines(keepends=True),
                                         f"released/{axis}", f"ours/{axis}"))
        assert not diff, "".join(diff)
    assert set(settings) == set(released.SETTINGS)
    differ = {k for k in settings if settings[k] != released.SETTINGS[k]}
    listed = _doc_differences()
    diff = "\n".join(f"{k}: released {released.SETTINGS[k]!r} / ours {settings[k]!r}" for k in sorted(differ))
    assert differ - set(listed) == set(), f"differences not listed in docs/benchmark.md:\n{diff}"
    assert set(listed) - differ == set(), f"docs/benchmark.md lists as different what is not: {set(listed) - differ}"
