"""Stage 2, mine & pair: the pure stage on the generated ground truth and on edge
cases, and the service on real databases and stores."""
from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from mining_fixtures import BORDER, FULL_FRAME, ONE_CAT, TINY, gt_clips, iou, make_clip, seed_video
from opensubject_tasks.backends.base import CategoryList, Detection
from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.config import MineSettings
from opensubject_tasks.geometry import box_area
from opensubject_tasks.steps.boxes import box_problem, find_merged, join_pieces, replace_boxes
from opensubject_tasks.steps.consensus import category_consensus
from opensubject_tasks.steps.identities import TrackedBox
from opensubject_tasks.steps.pairing import DIVERSITY_WEIGHTS, choose_pairs, shared_target
from opensubject_tasks.steps.subjects import MineResult, SubjectResult, mine_clip, subject_problem

RUNTIME = {"device": "cpu", "dtype": "auto", "batch_size": 4}
SETTINGS = MineSettings()


def backends():
    return {"vlm": get_backend("vlm", "none", **RUNTIME),
            "detector": get_backend("detector", "classical", **RUNTIME),
            "embedder": get_backend("embedder", "classical", **RUNTIME)}


def mine(frames, numbers, settings: MineSettings = SETTINGS) -> MineResult:
    return mine_clip(frames, numbers, settings=settings, **backends())


# ------------------------------------------------------------------- pure helpers

def test_category_consensus_keeps_what_most_frames_agree_on() -> None:
    lists = [CategoryList(["Cat", "cup"]), CategoryList(["cat."]), CategoryList(["cat", "dog"]),
             CategoryList([], error="unparsable reply")]
    got = category_consensus(lists, 0.5, 2)
    # divided by the 4 frames asked, not the 3 that answered
    assert got.kept == {"cat": 0.75} and got.answered == 3 and got.asked == 4 and got.reason is None
    assert got.named == {"cat": 0.75, "cup": 0.25, "dog": 0.25} and got.errors == ["unparsable reply"]
    assert category_consensus(lists, 0.25, 2).kept == {"cat": 0.75, "cup": 0.25, "dog": 0.25}


def test_category_consensus_keeps_valid_entries_and_records_refused_words() -> None:
    """The replies [dog, grass] [dog, sky] [dog, person] [dogs, tree], parsed as the hf
    VLM parses them: every frame votes for dog; grass and sky are refused and recorded."""
    from opensubject_tasks.backends.hf.vlm import parse_categories

    replies = ['{"categories": ["dog", "grass"]}', '{"categories": ["dog", "sky"]}',
               '{"categories": ["dog", "person"]}', '{"categories": ["dogs", "tree"]}']
    lists = [parse_categories(r) for r in replies]
    assert [cl.error for cl in lists] == [None] * 4
    got = category_consensus(lists, 0.5, 2)
    assert got.kept == {"dog": 1.0}
    assert got.named == {"dog": 1.0, "person": 0.25, "tree": 0.25}
    assert got.rejected == {"grass (not a subject)": 1, "sky (not a subject)": 1}
    assert got.reason is None


def test_category_consensus_fails_with_a_reason() -> None:
    one = [CategoryList(["dog"]), *[CategoryList([], error="reply is not JSON: 'x'")] * 3]
    got = category_consensus(one, 0.25, 2)        # dog on 1 of 4 would pass the share...
    assert got.kept == {} and got.reason.startswith("no category consensus: 1 of 4 keyframes")
    assert "at least 2 needed" in got.reason and "not JSON" in got.reason
    split = [CategoryList(["dog"]), CategoryList(["cat"]), CategoryList(["cow"]),
             CategoryList([], rejected=["sky (not a subject)"])]
    got = category_consensus(split, 0.5, 2)
    assert got.kept == {} and "no category named on 50% of 4 keyframes" in got.reason
    assert "refused: sky (not a subject)" in got.reason
    assert category_consensus([CategoryList([], error="empty reply")] * 3, 0.5, 2).reason


@pytest.fixture(scope="module")
def one_cat_clip():
    clip = make_clip(ONE_CAT)
    return clip.frames, list(range(0, 60, 10))


class _Replies:
    """A VLM that lists the given categories, frame after frame."""

    name = "scripted-vlm"

    def __init__(self, replies: list[CategoryList]) -> None:
        self.replies = replies

    def list_categories(self, images):
        return self.replies[:len(images)]


def test_clip_without_consensus_is_rejected_not_labelled_object(one_cat_clip) -> None:
    frames, numbers = one_cat_clip
    failing = _Replies([CategoryList([], raw="???", error="reply is not JSON: '???'")] * 4)
    r = mine_clip(frames, numbers, vlm=failing, detector=backends()["detector"],
                    embedder=backends()["embedder"], settings=SETTINGS)
    assert r.subjects == [] and r.pairs == [] and r.categories == {}
    assert r.reason.startswith("no category consensus: 0 of 4 keyframes gave a usable answer")
    assert r.details["consensus"]["errors"] == ["reply is not JSON: '???'"] * 4
    # configured fallback: unnamed subjects, said so
    fallback = mine_clip(frames, numbers, vlm=failing, detector=backends()["detector"],
                           embedder=backends()["embedder"],
                           settings=MineSettings(without_consensus="class_agnostic"))
    assert fallback.pairs and {x.category_source for x in fallback.subjects} == {"none"}
    assert fallback.details["consensus"]["reason"].startswith("no category consensus")


def test_box_problems_and_subject_reasons() -> None:
    w, h = 640, 360
    assert box_problem([100, 100, 300, 300], w, h, SETTINGS) is None
    assert box_problem([100, 100, 120, 115], w, h, SETTINGS) == "tiny"
    assert box_problem([5, 3, 636, 358], w, h, SETTINGS) == "full-frame"
    assert box_problem([0, 100, 200, 300], w, h, SETTINGS) == "border"
    assert box_problem([100, 100, 640, 300], w, h, SETTINGS) == "border"

    def subject(flags, usable, seen=6):
        return SubjectResult(0, "object", "none", 1.0, {i: [0, 0, 1, 1] for i in range(seen)},
                               {}, usable, flags)

    full = subject_problem(subject({i: "full-frame" for i in range(5)}, [5]), 6, SETTINGS)
    assert full.startswith("full-frame subject") and "5 of 6" in full
    assert subject_problem(subject({i: "tiny" for i in range(6)}, []), 6, SETTINGS).startswith("tiny subject")
    assert "frame border" in subject_problem(subject({0: "border", 1: "border"}, [2]), 6, SETTINGS)
    assert "overlaps another subject in 2 of 6" in subject_problem(subject({0: "overlap", 1: "overlap"}, [2]),
                                                                     6, SETTINGS)
    assert subject_problem(subject({}, [0, 1], seen=2), 6, SETTINGS) == "seen in only 2 of 6 keyframes"
    assert subject_problem(subject({}, [0, 1, 2, 3]), 6, SETTINGS) is None


def _view(frame: int, box, emb) -> TrackedBox:
    v = np.asarray(emb, np.float32)
    return TrackedBox(frame, Detection(list(map(float, box)), 0.9, "object", 0), v / np.linalg.norm(v))


def test_pairing_prefers_diverse_pairs_and_rejects_near_duplicates() -> None:
    numbers = [0, 10, 20, 30, 40, 50]
    e = [1.0, 0.1, 0.0]
    ident = [_view(0, [100, 100, 200, 200], e), _view(1, [100, 100, 200, 200], e),   # duplicate views
             _view(2, [150, 110, 270, 230], [1.0, 0.2, 0.1]),
             _view(3, [300, 150, 380, 250], [1.0, 0.25, 0.1]),
             _view(4, [60, 60, 260, 260], [0.2, 1.0, 0.0])]                          # another look
    s = MineSettings(max_pairs_per_subject=2)
    pairs, dropped = choose_pairs(ident, {0, 1, 2, 3, 4}, numbers, 640, 360, s)
    assert len(pairs) == 2
    assert dropped["near-duplicate"] == 1                # frames 0 and 1
    assert dropped["identity below threshold"] == 4      # frame 4 against every other view
    divs = [sc["diversity"] for _, _, sc in pairs]
    assert divs == sorted(divs, reverse=True) and min(divs) >= s.min_diversity
    for ref, tgt, sc in pairs:
        assert box_area(ref.det.box) >= box_area(tgt.det.box)   # larger view is the reference
        assert set(sc) >= {"identity", "diversity", "temporal", "scale", "position", "aspect", "appearance"}
        assert all(0.0 <= sc[k] <= 1.0 for k in DIVERSITY_WEIGHTS)


def test_pairing_takes_the_shared_target_first() -> None:
    numbers = [0, 10, 20, 30, 40, 50]
    ident = [_view(k, [40 + 60 * k, 100, 140 + 60 * k + 8 * k, 200], [1.0, 0.05 * k, 0.0]) for k in range(6)]
    s = MineSettings(max_pairs_per_subject=2)
    free, _ = choose_pairs(ident, set(range(6)), numbers, 640, 360, s)
    assert all(2 not in (r.frame, t.frame) for r, t, _ in free)      # frame 2 is not the most diverse
    pairs, _ = choose_pairs(ident, set(range(6)), numbers, 640, 360, s, prefer_target=2)
    assert len(pairs) == 2 and pairs[0][1].frame == 2 and pairs[0][0].frame != 2
    assert {frozenset((r.frame, t.frame)) for r, t, _ in pairs[1:]} <= {frozenset((r.frame, t.frame)) for r, t, _ in free}
    assert shared_target([{0, 1, 2}, {2, 3}, {3, 4}]) == 3 and shared_target([{0, 1}, {2, 3}]) is None


@pytest.mark.slow
def test_subjects_of_a_clip_share_a_target_frame(ground_truth) -> None:
    """Clips with two or more paired subjects have a target frame that several of their
    pairs share (the export's multi-subject samples); without shared_targets, fewer do."""
    def shares(r: MineResult) -> bool:
        targets: dict[int, set[int]] = {}
        for p in r.pairs:
            targets.setdefault(p.tgt_frame, set()).add(p.subject_idx)
        return max(len(v) for v in targets.values()) >= 2

    several = [(clip, r) for clip, r in ground_truth if len({p.subject_idx for p in r.pairs}) >= 2]
    assert len(several) >= 2 and all(shares(r) for _, r in several)
    apart = MineSettings(shared_targets=False)
    assert sum(shares(mine(c.frames, c.frame_numbers, apart)) for c, _ in several) < len(several)


def _track(boxes: dict[int, list[float]], emb) -> list[TrackedBox]:
    return [_view(k, b, emb) for k, b in sorted(boxes.items())]


# Two subjects crossing: apart on keyframes 0-1 and 3-4, one region on keyframe 2, where
# the detector's single box went to A and B has a gap.
_A = {0: [40, 100, 140, 200], 1: [100, 100, 200, 200], 2: [160, 95, 350, 205], 3: [220, 100, 320, 200],
      4: [280, 100, 380, 200]}
_B = {0: [460, 120, 540, 200], 1: [380, 120, 460, 200], 3: [120, 120, 200, 200], 4: [40, 120, 120, 200]}


def test_a_box_around_two_crossing_subjects_is_split() -> None:
    numbers = [0, 10, 20, 30, 40]
    idents = [_track(_A, [1.0, 0.1, 0.0]), _track(_B, [0.0, 1.0, 0.1])]
    parts = {i: d.box for i, k, d in find_merged(idents, 5, numbers) if k == 2}
    assert iou(parts[0], [160, 100, 260, 200]) > 0.9     # A where it was heading
    assert iou(parts[1], [250, 120, 330, 200]) > 0.9     # B, inside the merged box
    frames = [np.random.default_rng(k).integers(0, 255, (360, 640, 3), np.uint8) for k in range(5)]
    out = replace_boxes(idents, find_merged(idents, 5, numbers), frames,
                          get_backend("embedder", "classical", **RUNTIME), split=True)
    assert [len(i) for i in out] == [5, 5]
    split = [b for ident in out for b in ident if b.split]
    assert {b.frame for b in split} == {2} and len(split) == 2   # not used for pairs (see mine_clip)


def test_no_split_for_pieces_of_one_subject_or_a_subject_alone() -> None:
    numbers = [0, 10, 20, 30, 40]
    # B overlaps A before and after: two pieces of one subject (found whole on keyframe 2)
    upper = {k: [b[0], 100, b[2], 150] for k, b in _A.items() if k != 2} | {2: [160, 100, 260, 200]}
    legs = {k: [b[0], 140, b[2], 200] for k, b in _A.items() if k != 2}
    assert find_merged([_track(upper, [1.0, 0.1, 0.0]), _track(legs, [0.0, 1.0, 0.1])], 5, numbers) == []
    # A's box at keyframe 2 is A's own size: B is hidden behind A (or not found), A keeps its box
    alone = {**_A, 2: [160, 100, 260, 200]}
    behind = {0: [280, 120, 360, 200], 1: [220, 120, 300, 200], 3: [100, 120, 180, 200],
              4: [40, 120, 120, 200]}
    assert find_merged([_track(alone, [1.0, 0.1, 0.0]), _track(behind, [0.0, 1.0, 0.1])], 5, numbers) == []


def test_pieces_of_a_subject_are_joined_but_a_neighbour_is_not() -> None:
    numbers = [0, 10, 20, 30, 40]
    whole = {k: [b[0], b[1], b[2], b[3] + 60] for k, b in _A.items() if k != 2} | {2: [160, 100, 260, 200]}
    piece = {2: [165, 200, 255, 258]}                    # the lower part, found on its own
    neighbour = {2: [262, 120, 330, 258]}                # another subject right beside it
    idents = [_track(whole, [1.0, 0.1, 0.0]), _track(piece, [0.9, 0.3, 0.0]), _track(neighbour, [0.0, 1.0, 0.1])]
    joins, pieces = join_pieces(idents, numbers)
    assert [(i, k) for i, k, _ in joins] == [(0, 2)] and pieces == {(1, 2)}
    assert iou(joins[0][2].box, [160, 100, 260, 260]) > 0.9


# ----------------------------------------------------------- edge cases, classical

def test_clip_without_subject_gives_a_reason() -> None:
    clip = make_clip([], pan=(0.2, 0.1), zoom=1.2)
    r = mine(clip.frames, list(range(0, 60, 10)))
    assert r.pairs == [] and r.subjects == []
    assert r.reason.startswith("no subject") and r.category_source == "none"


@pytest.mark.parametrize("paths, expected", [(TINY, "tiny subject"), (BORDER, "frame border")])
def test_tiny_and_border_subjects_are_rejected_with_reasons(paths, expected) -> None:
    clip = make_clip(paths)
    r = mine(clip.frames, list(range(0, 60, 10)))
    assert r.pairs == []
    assert r.reason.startswith("no subject")
    assert any(s.state == "rejected" and expected in (s.reason or "") for s in r.subjects), \
        [(s.reason, s.boxes) for s in r.subjects]


def test_full_frame_subject_gives_no_pair_and_a_reason() -> None:
    # A subject filling the frame leaves the scene only at the edges: whatever the
    # detector makes of it, no pair comes out and the clip says why.
    clip = make_clip(FULL_FRAME, pan=(0.1, 0.0), zoom=1.1)
    r = mine(clip.frames, list(range(0, 60, 10)))
    assert r.pairs == [] and r.reason.startswith("no subject")
    assert all(s.reason for s in r.subjects)


def test_fewer_than_two_keyframes_is_a_reason_not_a_crash() -> None:
    clip = make_clip(BORDER, n=2)
    assert mine(clip.frames[:1], [0]).reason == "no subject: fewer than two keyframes"


# ------------------------------------------------------------ the generated ground truth

@pytest.fixture(scope="module")
def ground_truth(sample_media):
    """Every clip of the sample videos, mined (the tests that use it are marked slow)."""
    clips = gt_clips(sample_media)
    return [(c, mine(c.frames, c.frame_numbers)) for c in clips]


def _overlaps_other(clip, track: int, frame: int) -> bool:
    box = clip.boxes[track][frame]
    return any(iou(box, o[frame]) > 0 for t, o in clip.boxes.items() if t != track and frame in o)


@pytest.mark.slow
def test_grounding_boxes_match_the_ground_truth(ground_truth) -> None:
    """IoU >= 0.5 with the ground-truth box on >= 90% of the annotated keyframes, and
    of those where the subject does not overlap another subject. Where two subjects
    overlap they move as one region, which a motion-based detector reports as one box;
    the stage splits it where both were seen apart before and after (docs/mining.md)."""
    hits, total, sep_hits, sep_total = 0, 0, 0, 0
    for clip, r in ground_truth:
        for track, boxes in clip.boxes.items():
            for f, box in boxes.items():
                best = max((iou(box, s.boxes[f]) for s in r.subjects if f in s.boxes), default=0.0)
                total += 1
                hits += best >= 0.5
                if not _overlaps_other(clip, track, f):
                    sep_total += 1
                    sep_hits += best >= 0.5
    assert total > 100 and sep_total > 80
    assert sep_hits / sep_total >= 0.9, f"IoU >= 0.5 on {sep_hits}/{sep_total} keyframes of separate subjects"
    assert hits / total >= 0.9, f"IoU >= 0.5 on {hits}/{total} annotated subject keyframes"


@pytest.mark.slow
def test_identities_are_linked_across_keyframes(ground_truth) -> None:
    """The boxes that ground a ground-truth subject belong to one identity across the
    clip's keyframes (keyframes where it overlaps another subject aside: there both
    are one region, see the grounding test)."""
    linked = 0
    for clip, r in ground_truth:
        for track, boxes in clip.boxes.items():
            ids = set()
            for f, box in boxes.items():
                if _overlaps_other(clip, track, f):
                    continue
                ids.update(s.idx for s in r.subjects if f in s.boxes and iou(box, s.boxes[f]) >= 0.5)
            assert len(ids) <= 1, (clip.video, clip.idx, track, ids)
            linked += len(ids) == 1
    assert linked >= 0.8 * sum(len(c.boxes) for c, _ in ground_truth)


@pytest.mark.slow
def test_every_clip_with_a_moving_subject_yields_diverse_pairs(ground_truth) -> None:
    for clip, r in ground_truth:
        if not clip.boxes:
            assert r.pairs == [] and r.reason.startswith("no subject"), (clip.video, r.reason)
            continue
        assert r.pairs, (clip.video, clip.idx, r.reason)
        per_subject: dict[int, list] = {}
        for p in r.pairs:
            per_subject.setdefault(p.subject_idx, []).append(p)
            assert p.ref_frame != p.tgt_frame
            assert p.scores["identity"] >= SETTINGS.min_identity
            assert p.scores["diversity"] >= SETTINGS.min_diversity
            assert not (p.scores["box_iou"] >= SETTINGS.near_duplicate_iou
                        and p.scores["identity"] >= SETTINGS.near_duplicate_identity)
        assert all(len(v) <= SETTINGS.max_pairs_per_subject for v in per_subject.values())
        # pairs of one subject are distinct frame pairs
        for ps in per_subject.values():
            assert len({frozenset((p.ref_frame, p.tgt_frame)) for p in ps}) == len(ps)


# ------------------------------------------------------------------------ the service

@pytest.fixture(scope="module")
def two_videos(sample_media):
    clips = gt_clips(sample_media)
    with_subject = [c for c in clips if c.video == "cat_pan_cut.mp4"]
    without = [c for c in clips if c.video == "static_scene.mp4"]
    return with_subject, without


def _context(settings):
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import upgrade

    ctx = Context.from_settings(settings)
    upgrade(ctx.engine)
    return ctx


def _counts(ctx):
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Pair, Sample, Subject

    with session_scope(ctx.sessions) as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Subject, Pair, Sample))


def test_mine_service_writes_rows_idempotently(service_ctx, two_videos) -> None:
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Clip, Pair, Sample, Subject, Video
    from opensubject_tasks.services.common import run_stage
    from opensubject_tasks.steps.verdict import sample_seed

    ctx = service_ctx
    with_subject, without = two_videos
    vid = seed_video(ctx, with_subject)
    empty = seed_video(ctx, without)

    res = run_stage(ctx, "mine", vid)
    assert res.status == "ok", res.reason
    assert res.next == [("samples", vid)]   # one unit synthesizes and verifies the video's samples
    first = _counts(ctx)
    with session_scope(ctx.sessions) as s:
        samples = s.scalars(select(Sample).order_by(Sample.id)).all()
        assert samples
        for x in samples:
            pair = s.get(Pair, x.pair_id)
            subject = s.get(Subject, pair.subject_id)
            assert x.id == pair.id == f"{subject.id}-p{pair.ref_frame}-{pair.tgt_frame}"
            assert x.state == "pending" and x.attempt == 1 and x.build_id == "test-build"
            assert x.seed == sample_seed(x.id, 1, ctx.settings.synth.base_seed)
            assert subject.category == "object" and subject.category_source == "none"
            assert subject.state == "kept" and str(pair.ref_frame) in subject.boxes
            assert {"identity", "diversity"} <= set(pair.scores)
        assert s.get(Video, vid).stage_done == "mine"
        assert all(c.state == "mined" for c in s.scalars(select(Clip).where(Clip.video_id == vid)))
        # a sample that moved on keeps its state when mining runs again
        samples[0].state, samples[0].attempt = "verified", 2

    again = run_stage(ctx, "mine", vid)
    assert again.status == "ok"
    assert _counts(ctx) == first                                    # nothing duplicated
    assert again.next == [("samples", vid)]                         # the others still need work
    with session_scope(ctx.sessions) as s:
        kept = s.get(Sample, samples[0].id)
        assert (kept.state, kept.attempt) == ("verified", 2)
        for x in s.scalars(select(Sample)):   # once every sample has ended, no samples unit
            x.state = "rejected"
    assert run_stage(ctx, "mine", vid).next == []

    rejected = run_stage(ctx, "mine", empty)
    assert rejected.status == "rejected" and rejected.reason.startswith("no subject")
    with session_scope(ctx.sessions) as s:
        video = s.get(Video, empty)
        assert video.state == "rejected" and video.reason.startswith("no subject")
        clip = s.scalars(select(Clip).where(Clip.video_id == empty)).first()
        assert clip.reason.startswith("no subject")
    assert _counts(ctx) == first


def test_mine_service_refuses_unknown_video(embedded_settings) -> None:
    from opensubject_tasks.services.common import run_stage

    ctx = _context(embedded_settings)
    res = run_stage(ctx, "mine", "nope")
    assert res.status == "failed" and "does not exist" in res.reason
