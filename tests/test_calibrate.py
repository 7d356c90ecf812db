"""Same-individual thresholds calibrated on the ground-truth tracks of the sample media."""
from __future__ import annotations

import numpy as np
import pytest

from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.calibrate import Crop, best_threshold, calibrate, pair_similarities, track_crops
from opensubject_tasks.config import SAME_INDIVIDUAL_MIN, VerifySettings


@pytest.fixture(scope="module")
def crops(sample_media):
    return track_crops(sample_media)


def test_crops_come_from_ground_truth_tracks(crops) -> None:
    tracks = {(c.video, c.track) for c in crops}
    assert len(tracks) == 10 and {c.individual for c in crops} == {"cat", "cup", "person", "rocket",
                                                                    "motorcycle"}
    assert all(c.image.ndim == 3 and min(c.image.shape[:2]) >= 8 for c in crops)


def test_pairs_are_same_track_or_different_individuals() -> None:
    class Index:                        # the crop's pixel value as a one-hot vector: cosine 1 or 0
        name = "index"

        def embed(self, images):
            out = np.zeros((len(images), 8), np.float32)
            for i, im in enumerate(images):
                out[i, int(im[0, 0, 0])] = 1
            return out

    def c(video, track, individual, frame, value):
        return Crop(video, track, individual, frame, np.full((10, 10, 3), value, np.uint8))

    crops = [c("a", 0, "cat", 0, 1), c("a", 0, "cat", 5, 1), c("a", 1, "cup", 0, 2),
             c("b", 0, "cat", 0, 1),          # another video's track of the same individual: left out
             c("b", 1, "rocket", 3, 1)]       # a different individual that looks the same: a false accept
    same, different = pair_similarities(Index(), crops)
    assert same.tolist() == [1.0]
    assert sorted(different.tolist()) == [0.0] * 4 + [1.0] * 3   # cat-cup x3, cup-rocket, cat-rocket x3
    assert best_threshold(np.array([0.9, 0.95]), np.array([0.2, 0.5])) == 0.9   # the highest of equals


def test_shipped_classical_threshold_is_what_calibration_gives(crops) -> None:
    """The default in config is the calibration of the classical embedder on this media;
    a changed embedder fails here until it is calibrated again."""
    got = calibrate(get_backend("embedder", "classical"), crops)
    assert got.threshold == SAME_INDIVIDUAL_MIN["classical"] == VerifySettings().same_individual_threshold("classical")
    assert got.same > 500 and got.different > 5000
    assert got.same_accuracy >= 0.9 and got.different_accuracy >= 0.95


def test_tiny_clip_embedder_goes_through_the_same_calibration(crops) -> None:
    """The hf embedder code path (tiny random CLIP): measured and thresholded the same way."""
    emb = get_backend("embedder", "tiny", device="cpu", dtype="auto", batch_size=32)
    got = calibrate(emb, crops)
    assert got.embedder == "tiny:embedder" and got.threshold == SAME_INDIVIDUAL_MIN["tiny:embedder"]
    assert 0.5 < got.balanced_accuracy < 1.0
