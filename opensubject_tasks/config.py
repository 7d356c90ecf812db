"""One typed settings object for the whole product.

Sources, highest first: explicit arguments, environment variables
(``OPENSUBJECT_`` prefix, ``__`` between nested names, e.g.
``OPENSUBJECT_CURATE__MIN_SHORT_SIDE=480``), a YAML file (``OPENSUBJECT_CONFIG`` or
``load_settings(path)``), then the defaults below. Each stage owns one section.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from opensubject_tasks.errors import ConfigError


class _Section(BaseModel):
    # A misspelt key is an error naming it, not a setting silently ignored.
    model_config = ConfigDict(extra="forbid")


class StoreSettings(_Section):
    kind: Literal["local", "minio"] = "local"
    local_root: Path = Path("out/store")
    endpoint: str = "127.0.0.1:9000"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    secure: bool = False
    region: str | None = None
    bucket: str = "opensubject"
    raw_prefix: str = "raw/"
    presign_expiry_s: int = Field(900, ge=1, le=7 * 24 * 3600)
    multipart_part_size: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024)
    # Transient faults (connection errors, 5xx): bounded exponential backoff, then TransientError.
    retry_attempts: int = Field(8, ge=1, le=50)
    retry_initial_s: float = Field(0.5, gt=0, le=60)
    retry_max_wait_s: float = Field(20.0, gt=0, le=600)
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)  # between two reads, not for a whole transfer


class IngestSettings(_Section):
    # Folders on the workers that a source given from the UI or the API may name (with
    # everything below them); store://PREFIX sources are always allowed. Empty: store only.
    allowed_roots: list[Path] = Field(default_factory=list)
    # The scheduled listing stops at a segment's end after this long and the next run goes
    # on from there (below ingest's soft time limit, 600 s).
    listing_budget_s: float = Field(480.0, gt=0)
    # Prefixes whose new keys always sort after the old ones (e.g. raw/2026/12/07/...): listed
    # from the greatest key seen instead of compared segment by segment.
    append_only_prefixes: list[str] = Field(default_factory=list)


class CurateSettings(_Section):
    # OpenS2V-Nexus keeps clips whose shorter side is >= 480 px; the paper filters on
    # resolution too without a number: 480 is where the two agree
    min_short_side: int = Field(480, ge=1)
    min_duration_s: float = Field(1.0, ge=0)
    max_duration_s: float = Field(4 * 3600, gt=0)
    # Frames are scaled by the decoder's scaler to this width for analysis; 256 px is
    # PySceneDetect's own default effective width (it downscales to >= 256 px).
    analysis_width: int = Field(256, ge=32, le=1920)
    # analyse every n-th decoded frame only (all are still decoded); > 1 is faster, but
    # hard cuts are then found up to n-1 frames late (docs/curation.md has the numbers)
    analysis_step: int = Field(1, ge=1, le=4)
    detector: str = "adaptive"              # PySceneDetect detector run on every frame (hard cuts)
    detector_options: dict[str, Any] = Field(default_factory=dict)  # its keyword arguments
    gradual_detector: str = "histogram"     # run on frames gradual_span_s apart (dissolves); "none" = off
    gradual_span_s: float = Field(0.25, ge=0, le=5)
    min_shot_s: float = Field(0.6, ge=0)    # PySceneDetect's min_scene_len (15 frames at 25 fps)
    min_clip_s: float = Field(1.0, ge=0)
    max_clip_s: float = Field(10.0, gt=0)
    keyframes_per_clip: int = Field(6, ge=2, le=64)
    keyframe_max_side: int = Field(768, ge=64, le=4096)  # stored keyframes; boxes use this scale
    keyframe_quality: int = Field(92, ge=50, le=100)     # JPEG quality of stored keyframes
    # A pair's frames, decoded again from the video when the pair is synthesized (curation
    # records where each keyframe lies in the stream), longest side at most this: the
    # training targets and subject crops come from them. 1920 keeps 1080p at source
    # resolution; 0 = none (targets then come from the small JPEG keyframes).
    frame_max_side: int = Field(1920, ge=0, le=8192)
    min_quality: float = Field(0.3, ge=0, le=1)
    # coarse pass: skip decoding frames no other frame refers to (most B-frames), ~40 %
    # less decoding on common encodes, same shot precision/recall (docs/curation.md);
    # False decodes and analyses every frame
    decode_skip_nonref: bool = True
    # the one decode pass skips the deblocking filter (H.264, HEVC): about 10 % less curation
    # time on 720p H.264, the same shots on edits of real footage, keyframes 37-46 dB from the
    # filtered pictures (docs/performance.md); training targets are decoded again with the
    # filter (media/frames.py). Off by default: the mined keyframes stay as encoded.
    decode_skip_loop_filter: bool = False
    decode_threads: int = Field(0, ge=0)    # 0: FFmpeg's count, at least 8 from 640x360 (media/probe.py)
    decode_timeout_s: float = Field(600.0, gt=0)
    max_pixels: int = Field(7680 * 4320, gt=0)
    max_frames: int = Field(10_000_000, gt=0)
    # decoding fewer frames than this share of the container's count means truncated/corrupt
    min_decoded_share: float = Field(0.9, ge=0, le=1)


class MineSettings(_Section):
    consensus_frames: int = Field(4, ge=1, le=64)     # keyframes the VLM names categories on
    consensus_share: float = Field(0.5, gt=0, le=1)   # share of the frames asked that must name it
    consensus_min_answers: int = Field(2, ge=1, le=64)  # frames that must answer at all
    # A clip whose VLM answers agree on no category: "reject" it with the reason, or
    # "class_agnostic": ground the detector's unnamed subjects (category "object", source
    # "none") as without a VLM. The tiny profile uses the latter (its VLM is random).
    without_consensus: Literal["reject", "class_agnostic"] = "reject"
    min_box_area: float = Field(1 / 64, ge=0, le=1)   # share of the frame
    max_box_area: float = Field(0.85, gt=0, le=1)
    border_margin: float = Field(0.005, ge=0, le=0.2)  # share of the shorter side counted as border
    link_iou: float = Field(0.3, ge=0, le=1)           # overlap that links boxes across keyframes
    # embedding similarity (cosine) for the same identity; 0.75 suits the classical
    # embedder (measured in docs/mining.md), CLIP/DINO-class embedders want their own
    min_identity: float = Field(0.75, ge=-1, le=1)
    max_pairs_per_subject: int = Field(3, ge=1)
    # subjects of one clip first take a pair targeting the keyframe most of them are usable
    # on: their verified samples then make one multi-subject generation sample
    shared_targets: bool = True
    min_diversity: float = Field(0.1, ge=0, le=1)
    near_duplicate_iou: float = Field(0.9, ge=0, le=1)     # same place and size...
    near_duplicate_identity: float = Field(0.98, ge=-1, le=1)  # ...and same look: a duplicate


class SynthSettings(_Section):
    base_seed: int = 0
    erosion_px: int = Field(6, ge=0)                   # mean depth of the irregular boundary erosion
    erosion_variation: float = Field(0.6, ge=0, le=1)  # +- share of erosion_px along the boundary
    max_rotation_deg: float = Field(15.0, ge=0, le=180)
    scale_range: tuple[float, float] = (0.8, 1.1)
    flip_probability: float = Field(0.5, ge=0, le=1)
    # longest side of the generation canvas at most (never above the reference frame's)
    output_size: int = Field(1024, ge=64, le=2048)
    box_margin: float = Field(0.08, ge=0, le=0.5)      # manipulation box grown by this share (soft edges)
    # The subject is segmented in the target inside its box grown by this share of its size on
    # every side (a detector's box may hold only part of it); the manipulation box then
    # covers that mask.
    target_context: float = Field(0.5, ge=0, le=3)
    # ... and prompted again around what it found while that reaches the prompt's edge, up
    # to this many segmentations in all.
    target_rounds: int = Field(3, ge=1, le=8)
    # The samples unit of a video works through its samples this many at a time (each model
    # then gets that many images per call), and hands itself out again after this long so
    # that no task runs into its time limit (celery.time_limits.samples).
    batch_samples: int = Field(8, ge=1, le=256)
    task_budget_s: float = Field(900, gt=0)


class VerifySettings(_Section):
    max_attempts: int = Field(3, ge=1)
    min_identity: float = Field(0.6, ge=0, le=1)   # subject in generation input vs reference
    max_residual: float = Field(0.6, ge=0, le=1)   # subject left in the inpainted box
    max_artifact: float = Field(0.6, ge=0, le=1)   # seams along mask/box edges, blank fills
    # Mask sanity: the subject's share of the generation input and of the reference,
    # and the share of the mask held by its largest connected part.
    min_mask_share: float = Field(0.005, ge=0, le=1)
    max_mask_share: float = Field(0.9, gt=0, le=1)
    min_mask_connected: float = Field(0.8, ge=0, le=1)
    seam_band_px: int = Field(2, ge=1, le=32)       # width of the strips compared across an edge
    # Keypoint evidence (ORB + RANSAC similarity transform): Brown & Lowe's acceptance test
    # inliers > 5.9 + 0.22 * matches, as a ratio; >= this means "the same pixels are there".
    min_keypoint_ratio: float = Field(1.0, gt=0)
    min_keypoints: int = Field(15, ge=4)            # fewer on the reference: no keypoint check
    max_unchanged_in_box: float = Field(0.5, ge=0, le=1)  # box pixels equal to the target
    # The subject is still visible in the manipulation input: share of its mask in the
    # target (target_mask) whose pixels the manipulation input left as they were.
    max_subject_visible: float = Field(0.2, ge=0, le=1)
    # "all": a VLM verdict must also pass every classical check; "vlm": the VLM's answers
    # replace the classical identity/residual/artifact checks (mask sanity still applies).
    vlm_combine: Literal["all", "vlm"] = "all"
    # Same individual: least cosine between the reference and the target's subject crop,
    # per embedder model (name or model directory name; a cosine means something only for
    # the embedder that gave it). Measured by `opensubject models calibrate` on
    # ground-truth tracks (docs/models.md); entries given here add to these.
    same_individual_min: dict[str, float] = Field(default_factory=lambda: dict(SAME_INDIVIDUAL_MIN))
    # Share of each box's width and height, around its centre, that is compared: the
    # subject fills a box's middle, its corners show the scene, which two subjects of one
    # clip share (docs/models.md: 0.6 against the whole box on the sample media).
    same_individual_centre: float = Field(0.6, gt=0, le=1)

    @field_validator("same_individual_min", mode="after")
    @classmethod
    def _keep_calibrated(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not -1.0 <= float(v) <= 1.0}
        if bad:
            raise ValueError(f"thresholds are cosines between -1 and 1, got {bad}")
        return {**SAME_INDIVIDUAL_MIN, **value}

    def same_individual_threshold(self, embedder: str) -> float:
        """The calibrated threshold of an embedder (by backend name, then model name)."""
        for key in (embedder, embedder_key(embedder)):
            if key in self.same_individual_min:
                return float(self.same_individual_min[key])
        raise ConfigError(
            f"verify.same_individual_min has no threshold for embedder {embedder!r} (known: "
            f"{', '.join(sorted(self.same_individual_min))}); measure one with `opensubject models "
            f"calibrate` and add it as `{embedder_key(embedder)}: <value>`")


# Calibrated on the ground-truth tracks of `opensubject samples make` (seed 0) with
# `opensubject models calibrate`; docs/models.md has the accuracies, also on other media.
SAME_INDIVIDUAL_MIN: dict[str, float] = {"classical": 0.88, "tiny:embedder": 0.97}  # 480p sample media, seed 0


def embedder_key(name: str) -> str:
    """The model part of an embedder's name: ``hf:openai/clip-vit-large-patch14`` and
    ``hf:/models/clip-vit-large-patch14`` are both ``clip-vit-large-patch14``."""
    if ":" in name and name.split(":", 1)[0] in ("hf", "small"):
        return name.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1]
    return name


class ExportSettings(_Section):
    # samples per WebDataset shard; an export is planned as shards of this many, in id order
    shard_max_samples: int = Field(1000, ge=1)
    # most tasks an export is split into (keep within Airflow's [core] max_map_length)
    max_parts: int = Field(1024, ge=1)
    report_grid: int = Field(24, ge=0)
    report_worst: int = Field(8, ge=0)              # worst-scoring verified samples shown
    report_thumb_px: int = Field(160, ge=32, le=1024)
    report_seed: int = 0                            # picks the report's random sample grid
    omnigen2: bool = True                           # also write Images/ + omnigen2/ (training layout)
    # OmniGen2 opens record paths as written: "absolute" works from any working directory.
    # The root is omnigen2_root, else the export folder itself (a local export); an
    # object-store export without omnigen2_root (where will the trainers mount it?) is
    # written with relative paths and says so in stats.json.
    omnigen2_paths: Literal["absolute", "relative"] = "absolute"
    omnigen2_root: str | None = None                # where trainers see the export, e.g. /data/ds

    @model_validator(mode="after")
    def _root_is_absolute(self) -> ExportSettings:
        if self.omnigen2_root is not None and not self.omnigen2_root.startswith("/"):
            raise ValueError(f"omnigen2_root must be an absolute path, got {self.omnigen2_root!r}")
        return self
    # Bench folders (`opensubject bench build --out`) whose held-out videos the training
    # export leaves out, so that no video is both trained on and benchmarked.
    exclude_bench_dirs: list[Path] = Field(default_factory=list)


class BackendSettings(_Section):
    """Backend names per interface (see opensubject_tasks.backends.registry)."""
    vlm: str = "none"
    detector: str = "classical"
    segmenter: str = "classical"
    inpainter: str = "classical"
    embedder: str = "classical"
    quality: str = "classical"
    verifier: str = "classical"
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-backend kwargs
    batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    dtype: str = "auto"
    # Where `opensubject models fetch` puts weights (<owner>/<name> per Hub model) and
    # backends look first; then the Hugging Face cache. Nothing is downloaded at run time.
    models_dir: Path = Path("~/.cache/opensubject/models")


class StageTimeLimit(_Section):
    # SoftTimeLimitExceeded is raised in the task: recorded, retried. None: no soft limit.
    soft_s: float | None = Field(gt=0)
    hard_s: float = Field(gt=0)   # the pool process is killed: recorded by the worker, retried

    @model_validator(mode="after")
    def _hard_after_soft(self) -> StageTimeLimit:
        if self.soft_s is not None and self.hard_s <= self.soft_s:
            raise ValueError(f"hard_s ({self.hard_s}) must be greater than soft_s ({self.soft_s})")
        return self


class CelerySettings(_Section):
    result_backend: str | None = None  # default: db+<database_url>
    soft_time_limit_s: float = Field(1800, gt=0)   # stages without their own entry below
    hard_time_limit_s: float = Field(2100, gt=0)
    # Per stage (task name without the "opensubject." prefix). Model stages get the most.
    time_limits: dict[str, StageTimeLimit] = Field(default_factory=lambda: {
        "ingest": StageTimeLimit(soft_s=600, hard_s=660),
        "curate": StageTimeLimit(soft_s=1800, hard_s=2100),
        "mine": StageTimeLimit(soft_s=1800, hard_s=2100),
        "samples": StageTimeLimit(soft_s=1800, hard_s=2100),   # synth.task_budget_s 900 below it
        "synthesize": StageTimeLimit(soft_s=900, hard_s=1080),
        "verify": StageTimeLimit(soft_s=600, hard_s=720),
        "export_plan": StageTimeLimit(soft_s=600, hard_s=660),
        "export_part": StageTimeLimit(soft_s=3600, hard_s=3900),
        "export": StageTimeLimit(soft_s=3600, hard_s=3900),
        "reconcile": StageTimeLimit(soft_s=600, hard_s=660),
    })
    # A message not acknowledged within this time is delivered again (Redis broker): it must
    # exceed the longest hard limit and the longest retry delay.
    visibility_timeout_s: int = Field(7200, ge=2)
    # How often a worker looks for unacknowledged messages of dead workers (seconds); the
    # scan runs every interval x throttle seconds. Production keeps kombu's defaults.
    unacked_restore_interval_s: int = Field(10, ge=1)
    unacked_restore_throttle: int = Field(10, ge=1)
    # Prefix for every broker key, so that several installations (or test runs) can share
    # one Redis database without taking each other's messages.
    broker_key_prefix: str = ""
    max_retries: int = Field(5, ge=0)
    # A task whose process dies under it (out of memory, a crash in native code) is given back
    # to the queue; after this many deaths in a row its video or sample fails instead.
    max_worker_lost: int = Field(3, ge=1)
    # How long a pool process may take to load its models before it reports ready
    # (Celery's worker_proc_alive_timeout, 4 s by default). The first processes are not
    # timed, but a replacement for one that died (out of memory, a hard time limit) is
    # killed after this long: below the model load time no replacement ever comes up.
    # Profiles set it from their models' load time.
    worker_ready_timeout_s: float = Field(60.0, gt=0)
    # The reconciler sends again work handed out longer ago than this whose message the broker
    # no longer holds and that no worker runs (keep it above the longest stage).
    reconcile_after_s: float = Field(1800.0, gt=0)
    # With a broker whose queues cannot be read (not Redis), queued work looks lost: it is
    # sent again only after this long, and at most reconcile_blind_max units per pass.
    reconcile_blind_after_s: float = Field(21600.0, gt=0)
    reconcile_blind_max: int = Field(100, ge=0)
    # At most this many videos of the builds are queued or running at once; the others wait
    # in the database and each video that leaves the queues pulls the next one, from any
    # chunk (services/handoff.py). Size it to keep every worker fed: a few per worker slot.
    max_videos_in_flight: int = Field(2000, ge=1)
    retry_backoff_s: float = Field(5.0, gt=0)        # first delay; doubles each retry
    retry_backoff_max_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(5.0, gt=0)        # how often Airflow's triggers look at progress
    # A trigger that resumes its task fires no sooner than this after it started: the
    # scheduler must first see the deferring run's own exit, or it takes the resumed task for
    # a stray (Airflow race, apache/airflow#67287 and #72716) and retries it. A trigger that
    # ends its task does not wait.
    trigger_min_wait_s: float = Field(5.0, ge=0)

    def limits(self, stage: str) -> StageTimeLimit:
        return self.time_limits.get(stage) or StageTimeLimit(soft_s=self.soft_time_limit_s,
                                                             hard_s=self.hard_time_limit_s)

    @model_validator(mode="after")
    def _visibility_covers_tasks(self) -> CelerySettings:
        longest = max([self.hard_time_limit_s, self.retry_backoff_max_s,
                       *(lim.hard_s for lim in self.time_limits.values())])
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed the longest hard "
                f"time limit and retry delay ({longest:g}); otherwise running tasks are delivered twice")
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ValueError("hard_time_limit_s must be greater than soft_time_limit_s")
        return self


class DatabaseSettings(_Section):
    """Connections of one process (PostgreSQL; SQLite ignores the pool). A process holds
    at most ``pool_size + max_overflow`` connections: the bound docker-compose sizes
    PostgreSQL's ``max_connections`` from (docs/distributed.md)."""
    pool_size: int = Field(2, ge=1)          # kept open between tasks
    max_overflow: int = Field(2, ge=0)       # opened for a moment when the kept ones are busy
    pool_timeout_s: float = Field(30.0, gt=0)  # wait for a free connection, then a retried error
    # Entity leases (db/locks.py): a run that stops renewing its lease (its host lost, its
    # process frozen) is taken over this long after its last renewal; renewed every third.
    lease_ttl_s: float = Field(60.0, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OPENSUBJECT_", env_nested_delimiter="__", extra="forbid"
    )

    profile: Literal["cpu", "gpu", "tiny", "small"] = "cpu"
    database_url: str = "sqlite:///out/opensubject.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    curate: CurateSettings = Field(default_factory=CurateSettings)
    mine: MineSettings = Field(default_factory=MineSettings)
    synth: SynthSettings = Field(default_factory=SynthSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    backends: BackendSettings = Field(default_factory=BackendSettings)
    celery: CelerySettings = Field(default_factory=CelerySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls), file_secret_settings)

    def secrets(self) -> list[str]:
        """Configured secret values, for redaction in logs and reports."""
        vals = [self.store.access_key.get_secret_value(), self.store.secret_key.get_secret_value()]
        for url in (self.database_url, self.broker_url, self.celery.result_backend or ""):
            password = urlsplit(url).password if "@" in url else None
            if password:  # as written in the URL and percent-decoded, as a client may print it
                vals += [password, unquote(password)]
        return list(dict.fromkeys(v for v in vals if v))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by OPENSUBJECT_CONFIG (or set by load_settings)."""

    path: Path | None = None

    def get_field_value(self, field, field_name):  # noqa: ANN001 - required by the base class
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _YamlSource.path or (
            Path(os.environ["OPENSUBJECT_CONFIG"]) if os.environ.get("OPENSUBJECT_CONFIG") else None
        )
        if path is None:
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        return data


PROFILE_BACKENDS: dict[str, dict[str, str]] = {
    "cpu": {},  # the classical defaults above
    "gpu": {"vlm": "hf", "detector": "hf", "segmenter": "hf", "inpainter": "hf",
            "embedder": "hf", "quality": "hf", "verifier": "vlm", "device": "auto"},
    "tiny": {"vlm": "tiny", "detector": "tiny", "segmenter": "tiny", "inpainter": "tiny",
             "embedder": "tiny", "quality": "tiny", "verifier": "vlm"},
    # Small real models on a CPU (docs/models.md): Florence-2 names, grounds and captions;
    # it answers no yes/no questions, so the classical verifier checks the samples.
    "small": {"vlm": "florence", "detector": "florence", "segmenter": "hf", "inpainter": "hf",
              "embedder": "hf", "quality": "classical", "verifier": "classical", "device": "cpu"},
}

# Backend options a profile sets, per interface; configured keys win one by one.
PROFILE_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "vlm": {"model": "florence-community/Florence-2-base"},
        "detector": {"model": "florence-community/Florence-2-base"},
        "segmenter": {"model": "facebook/sam-vit-base"},
        # LCM-distilled Stable Diffusion 1.5: 4 steps, guidance as an embedding (w = 8),
        # inpainting by latent blending (its UNet has 4 input channels)
        "inpainter": {"model": "SimianLuo/LCM_Dreamshaper_v7", "pipeline_class": "StableDiffusionInpaintPipeline",
                      "steps": 4, "guidance_scale": 8.0, "strength": 1.0, "resolution": 512, "batch_size": 1},
        "embedder": {"model": "facebook/dinov2-small"},
    },
}


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings, turning validation errors into a ConfigError naming each field."""
    _YamlSource.path = Path(path) if path else None
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}{_shown_input(err)}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    finally:
        _YamlSource.path = None
    return apply_profile(settings)


_SECRET_HINTS = ("secret", "password", "token", "url", "backend", "access_key")


def _shown_input(err: Any) -> str:
    # Echo the offending value only when it cannot carry a secret: a scalar of a field
    # whose name does not suggest credentials (a section's whole input may hold URLs).
    value = err.get("input")
    name = str(err["loc"][-1]).lower() if err.get("loc") else ""
    if isinstance(value, (dict, list, tuple)) or any(h in name for h in _SECRET_HINTS):
        return ""
    return f" (got {value!r})"


# Stage settings a profile changes, unless they were set explicitly.
PROFILE_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    # The tiny VLM is random and never agrees on a category: ground unnamed subjects.
    "tiny": {"mine": {"without_consensus": "class_agnostic"}},
    # Loading real weights (several GB from a network disk, moved to the GPU) takes
    # minutes; the CPU models of the small profile about a minute.
    "small": {"celery": {"worker_ready_timeout_s": 300.0}},
    "gpu": {"celery": {"worker_ready_timeout_s": 900.0}},
}


def apply_profile(settings: Settings) -> Settings:
    """Fill backend names and profile settings unless they were set explicitly."""
    explicit = settings.backends.model_fields_set
    for key, name in PROFILE_BACKENDS[settings.profile].items():
        if key not in explicit:
            setattr(settings.backends, key, name)
    for interface, opts in PROFILE_OPTIONS.get(settings.profile, {}).items():
        settings.backends.options[interface] = {**opts, **settings.backends.options.get(interface, {})}
    for section, values in PROFILE_SETTINGS.get(settings.profile, {}).items():
        target = getattr(settings, section)
        for key, value in values.items():
            if key not in target.model_fields_set:
                setattr(target, key, value)
    return settings
