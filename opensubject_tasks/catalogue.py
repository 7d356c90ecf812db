"""The pipeline's vocabulary in one place: stages, the entity each works on, its queue, the
stage after it (the one graph the embedded runner, the Celery chain and the Airflow chunk
follow: ``FIRST_STAGE``, ``follow``) and the service module that implements it; the states of videos, samples and builds and which of them are
terminal; attempt statuses. Imports nothing heavy: Airflow's DAG files, triggers, the
Celery router and the dashboard read it without loading a stage.
"""
from __future__ import annotations

from dataclasses import dataclass

# --- queues ----------------------------------------------------------------------------------
CPU, GPU, MAINTENANCE = "cpu", "gpu", "maintenance"
QUEUES = (CPU, GPU, MAINTENANCE)


@dataclass(frozen=True)
class Stage:
    name: str
    entity: str          # video | sample | build | source | export_part | system
    queue: str
    next: str | None     # the stage a success hands the entity (or its samples) to
    backends: tuple[str, ...] = ()  # model interfaces it calls (a worker loads them at start)
    service: str | None = None      # opensubject_tasks.<service> registers its function
    retry: str | None = None        # where a failed check sends the entity for another attempt


# The pipeline's stages in order, then the work that runs on workers around them. A
# video's samples are synthesized and verified by one ``samples`` unit per video, so the
# GPU models see batches; ``synthesize`` and ``verify`` are the steps it records on each
# sample (an attempt row per sample and step, as when a sample runs alone).
PIPELINE = (
    Stage("curate", "video", CPU, "mine", ("quality",), "services.curate"),
    Stage("mine", "video", GPU, "samples", ("vlm", "detector", "embedder"), "services.mine"),
    Stage("samples", "video", GPU, None, ("segmenter", "inpainter", "verifier", "embedder", "vlm"), "services.samples"),
)
SAMPLE_STEPS = (
    Stage("synthesize", "sample", GPU, "verify", ("segmenter", "inpainter"), "services.synthesize"),
    Stage("verify", "sample", GPU, None, ("verifier", "embedder", "vlm"), "services.verify", retry="synthesize"),
)
AUXILIARY = (
    Stage("ingest", "source", MAINTENANCE, None),
    Stage("export_plan", "build", CPU, None, service="export.service"),        # an export's shards, in parts
    Stage("export_part", "export_part", CPU, None, service="export.service"),  # a range of shards of an export
    Stage("export", "build", CPU, None, service="export.service"),             # manifest, stats, report, layout
    Stage("reconcile", "system", MAINTENANCE, None),
)
STAGES = {s.name: s for s in PIPELINE + SAMPLE_STEPS + AUXILIARY}
STAGE_ORDER = ("curate", "mine", "samples", "synthesize", "verify", "export")
VIDEO_STAGES = tuple(s.name for s in PIPELINE)
SAMPLE_STAGES = tuple(s.name for s in SAMPLE_STEPS)
# Where a build hands each video first.
FIRST_STAGE = PIPELINE[0].name
# The video unit that runs a video's sample steps in batches: a sample step run alone
# hands its video back to it.
SAMPLE_UNIT = "samples"
assert SAMPLE_UNIT in VIDEO_STAGES


def follow(stage: str, entity_id: str) -> list[tuple[str, str]]:
    """The unit a success of ``stage`` on ``entity_id`` hands on to (none after the last)."""
    after = STAGES[stage].next
    return [(after, entity_id)] if after else []


def retry(stage: str, entity_id: str) -> list[tuple[str, str]]:
    """The unit a failed check of ``stage`` on ``entity_id`` sends it back to."""
    again = STAGES[stage].retry
    if again is None:
        raise ValueError(f"stage {stage} sends nothing back for another attempt")
    return [(again, entity_id)]


def stage_reached(stage_done: str | None, stage: str) -> bool:
    """Whether a video whose last completed stage is ``stage_done`` has completed ``stage``."""
    return stage_done in STAGE_ORDER and STAGE_ORDER.index(stage_done) >= STAGE_ORDER.index(stage)


def runs(stage: str, until: str) -> bool:
    """Whether a build that goes up to ``until`` runs ``stage``."""
    return until not in STAGE_ORDER or STAGE_ORDER.index(stage) <= STAGE_ORDER.index(until)


# --- states ----------------------------------------------------------------------------------
# videos: registered -> running -> done | rejected (input below the bar) | failed
VIDEO_TERMINAL = ("done", "rejected", "failed")
# samples: pending -> synthesized -> verified | rejected | failed (or back to pending)
SAMPLE_IN_FLIGHT = ("pending", "synthesized")
SAMPLE_TERMINAL = ("verified", "rejected", "failed")
# Finished with a result: a later error never turns these into "failed".
SUCCEEDED = {"video": "done", "sample": "verified"}
BUILD_STATES = ("running", "done", "failed")

# stage_attempts.status: running | ok | rejected | failed (bad input) | error | timeout | lost
ATTEMPT_ENDED = ("ok", "rejected", "failed")
ATTEMPT_ERRORS = ("error", "timeout", "lost")   # the code or the system broke, not the input

# --- a sample's images ------------------------------------------------------------------------
# What synthesis stores per attempt (``<name>.png``), verification reads and the export ships.
SAMPLE_IMAGES = ("reference", "mask", "generation_input", "generation_mask",
                 "manipulation_input", "manipulation_mask", "target", "target_mask")
# bool images, stored 0/255; target_mask: the subject in the target (what the manipulation
# input must no longer show)
SAMPLE_MASKS = ("mask", "generation_mask", "manipulation_mask", "target_mask")
# Images a sample may lack: one synthesized before they were kept (its checks are skipped)
SAMPLE_OPTIONAL = ("target_mask",)

# How far a build goes (the build DAG's `until`, the CLI's --until): the last stage run.
UNTIL = ("curate", "mine", "verify")


def settled(state: str, stage_done: str | None, until: str = "verify") -> bool:
    """A video needs nothing more from a build that runs up to ``until``."""
    if state in VIDEO_TERMINAL:
        return True
    return until != "verify" and stage_reached(stage_done, until)
