"""A model call that hangs inside a stage: the stage's soft or hard time limit ends it,
the attempt is recorded as a timeout and sent again, and the build (driven and checked as
in tests/test_faults.py) ends exactly like an undisturbed one."""
from __future__ import annotations

from pathlib import Path

import pytest
from fault_fixtures import attempts, check_finished_build, drive_build, upload

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize(("stage", "limit"), [("samples", "soft"), ("samples", "hard"), ("mine", "hard")])
def test_hung_stage_hits_its_time_limit_and_is_retried(stage, limit, stack, pg_db, s3_store_settings, media,
                                                       reference, tmp_path):
    """A model call that hangs (a test backend loaded into the worker, selected by
    configuration) in a video's samples unit (its inpainter) or in mine: the soft time limit
    raises in the task (``soft``), or, when the call swallows that, the hard limit kills
    the pool process (``hard``). Either way the attempt is recorded as a timeout, the task is sent
    again and the build finishes exactly; a video whose mining was killed is never taken
    for one without subjects (nothing is decided before mining has run)."""
    token = tmp_path / "hang-token"
    interface = {"samples": "INPAINTER", "mine": "DETECTOR"}[stage]
    # Limits well above what a unit takes on these videos on a busy machine (a samples
    # unit seconds, mining more): only the hung call may reach them.
    soft, hard = (8, 14) if stage == "samples" else ("null", 30)
    env = stack.apply(pg_db, s3_store_settings,
                      **{f"OPENSUBJECT_BACKENDS__{interface}": "hang_once"},
                      OPENSUBJECT_TEST_HANG_ONCE=str(token),
                      OPENSUBJECT_TEST_HANG_MODE=limit,
                      OPENSUBJECT_CELERY__TIME_LIMITS=f'{{"{stage}": {{"soft_s": {soft}, "hard_s": {hard}}}}}',
                      PYTHONPATH=str(Path(__file__).parent))
    upload(stack.store, media)
    worker = stack.worker(env, f"hang-{stage}-{limit}", concurrency=2, include="hang_backend")

    # The reconciler looks for work handed out longer ago than the hard limit plus the retry
    # delay, as in production (30 min against limits of minutes).
    run = drive_build("faults", timeout_s=400, reconcile_age_s=hard + 10)

    assert token.exists(), "the hang was never injected"
    assert not run.failures, run.failures
    ctx = stack.context()
    counts = check_finished_build(ctx, stack.store, "faults", reference)
    assert counts["videos"] == 3
    timed_out = [a for a in attempts(ctx) if a.status == "timeout" and a.stage == stage]
    assert len(timed_out) == 1, timed_out
    hung = timed_out[0]
    if stage == "samples":
        # the samples of the batch the hang cut short: their synthesize attempts are closed
        # (timeout in the task, or lost when the next run found them), then ran again, once
        cut = [a for a in attempts(ctx) if a.stage == "synthesize" and a.status in ("timeout", "lost")]
        assert cut and {a.status for a in cut} == {"timeout" if limit == "soft" else "lost"}, \
            [(a.stage, a.entity_id[:6], a.status, a.started_at.time()) for a in attempts(ctx)
             if a.stage in ("samples", "synthesize")]
        for a in cut:
            after = [b.status for b in attempts(ctx) if b.stage == "synthesize" and b.entity_id == a.entity_id]
            assert after[-1] in ("ok", "rejected") and after.count("ok") <= 2, after  # <= 2: a re-synthesis
    tries = [a for a in attempts(ctx) if a.stage == stage and a.entity_id == hung.entity_id]
    if limit == "soft":
        assert "SoftTimeLimitExceeded" in hung.error
        assert soft - 0.5 < (hung.finished_at - hung.started_at).total_seconds() < hard
        assert "Retry in" in worker.log()
        assert tries[0] == hung
    else:
        # The worker closes the killed attempt as a timeout; the process, terminated, cannot
        # overwrite it (one row for the kill, not a "lost" or "SystemExit" one besides).
        assert "hard time limit exceeded" in hung.error
        assert f"Hard time limit ({hard:.1f}s) exceeded" in worker.log() and "hit the hard time limit" in worker.log()
        assert tries[:-1] == [hung], [(a.status, a.error) for a in tries]
    assert tries[-1].status == "ok", [a.status for a in tries]
