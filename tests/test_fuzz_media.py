"""Fuzz: hundreds of mutated videos through probe and the curate stage. None may
crash the process, hang past the time bound, or end without a recorded reason."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import StageAttempt, Video
from opensubject_tasks.testmedia.mutate import mutations
from opensubject_tasks.testmedia.samples import encode, photo
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.services.ingest import (claim_videos, ensure_build, register_source,
                                               video_id_for)

N_MUTATIONS = 560  # 80 of each of the 7 mutation kinds
BOUND_S = 20.0     # per video: decode_timeout_s plus probing and writing


def _seed_videos(d: Path) -> list[Path]:
    """Two small valid videos (one with the index at the front) to mutate."""
    d.mkdir()
    img = photo("coffee")
    out = []
    for i, faststart in enumerate((False, True, False)):
        frames = [np.roll(img[:180, :320], (6 + i) * k, axis=1) for k in range(30 + 7 * i)]
        p = d / f"seed{i}.mp4"
        encode(p, frames, (320, 180), fps=15, faststart=faststart)
        out.append(p)
    return out


@pytest.mark.slow
def test_mutated_videos_end_with_a_reason(tmp_path: Path) -> None:
    seeds = _seed_videos(tmp_path / "seeds")
    files = list(mutations(seeds, N_MUTATIONS, tmp_path / "fuzz", seed=1234))
    for p in seeds:  # the unmutated originals must go through: the path can succeed
        (tmp_path / "fuzz" / p.name).write_bytes(p.read_bytes())
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        store={"kind": "local", "local_root": str(tmp_path / "store")},
        curate={"decode_timeout_s": 10, "min_duration_s": 0.5, "min_clip_s": 0.5,
                "min_short_side": 120},
    )
    ctx = Context.from_settings(settings)
    upgrade(ctx.engine)
    ensure_build(ctx, "fuzz", {}, "cpu")
    reg = register_source(ctx, str(tmp_path / "fuzz"), build_id="fuzz")
    claim_videos(ctx, "fuzz", None)
    ids = reg.new_ids
    # identical mutations collapse into one video by content identity; at least 500 differ
    assert 500 + len(seeds) <= len(ids) <= N_MUTATIONS + len(seeds)

    slowest = (0.0, "")
    for vid in ids:
        t0 = time.perf_counter()
        result = run_stage(ctx, "curate", vid)  # must not raise: bad input is a result
        elapsed = time.perf_counter() - t0
        assert result.status in ("ok", "rejected", "failed")
        if elapsed > slowest[0]:
            slowest = (elapsed, vid)
        assert elapsed < BOUND_S, f"{vid} took {elapsed:.1f}s"

    with session_scope(ctx.sessions) as s:
        videos = list(s.scalars(select(Video).where(Video.build_id == "fuzz")))
        attempts = s.scalar(select(func.count()).select_from(StageAttempt)
                            .where(StageAttempt.stage == "curate"))
        by_state: dict[str, int] = {}
        for v in videos:
            by_state[v.state] = by_state.get(v.state, 0) + 1
            if v.state in ("failed", "rejected"):
                assert v.reason and len(v.reason) > 5, (v.name, v.reason)
                assert "Traceback" not in v.reason
            else:  # it decoded: the curate stage went through
                assert v.stage_done == "curate", (v.name, v.state)
        slow_name = next(v.name for v in videos if v.id == slowest[1])
        seed_ids = {video_id_for(hashlib.sha256(p.read_bytes()).hexdigest()) for p in seeds}
        originals = [v for v in videos if v.id in seed_ids]
        assert [v.state for v in originals] == ["running"] * len(seeds), \
            [(v.name, v.reason) for v in originals]
        reasons: dict[str, int] = {}
        for v in videos:
            if v.reason:
                key = v.reason.split(":")[0][:60]
                reasons[key] = reasons.get(key, 0) + 1
    assert attempts == len(ids)
    print(json.dumps({"mutations": len(files), "videos": len(ids), "states": by_state,
                      "slowest_s": round(slowest[0], 2), "slowest": slow_name,
                      "top_reasons": sorted(reasons.items(), key=lambda kv: -kv[1])[:12]}, indent=1))
