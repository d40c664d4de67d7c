"""Quality score: box SSIM/PSNR, the nearest-neighbour baseline, the pose distance, the plot."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import pytest

from cloud_trainer.corpus import Corpus, TakeData, build_corpus
from cloud_trainer.score import (
    box_metrics,
    nearest_pose,
    person_box,
    plot_progress,
    score_generator,
)
from edge_agent import skeleton as sk

MODELS = Path(__file__).resolve().parents[2] / "models"


def corpus_of(tmp: Path, size: int) -> Corpus:
    take = TakeData.from_synth(
        4, 9, seconds=3, fps=8, size=(size * 2, size * 3 // 2), transfer_dance=10, transfer_frames=3
    )
    return build_corpus([take], tmp, size_px=size, label_map="skeleton", holdout_fraction=0.15)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return corpus_of(tmp_path_factory.mktemp("corpus"), 32)


def oracle(corpus: Corpus):
    """A 'generator' that returns the true frame of every label it was asked about."""
    table = {}
    for split in ("train", "holdout", "transfer"):  # scored splits win label collisions
        ex = corpus.examples(split)
        for label, frame in zip(ex.labels, ex.frames, strict=True):
            table[label.tobytes()] = frame
    return lambda labels: np.stack([table[x.tobytes()] for x in labels])


def test_identical_images_score_one_and_the_psnr_cap() -> None:
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert box_metrics(img, img, (0, 0, 32, 32)) == (1.0, 100.0)
    noisy = np.clip(img.astype(int) + 40, 0, 255).astype(np.uint8)
    ssim, psnr = box_metrics(noisy, img, (4, 4, 28, 28))
    assert ssim < 1.0 and 10 < psnr < 40


def test_person_box_adds_room_for_the_head_and_stays_inside_the_image() -> None:
    s = sk.empty()
    s[sk.INDEX["nose"]] = (16, 10, 1)
    s[sk.INDEX["left_ankle"]] = (18, 30, 1)
    s[sk.INDEX["right_ankle"]] = (14, 30, 1)
    x0, y0, x1, y1 = person_box(s, 32)
    assert y0 < 10 and y1 <= 32 and x0 >= 0 and x1 <= 32 and x0 < 14 and x1 > 18
    assert person_box(sk.empty(), 32) == (0, 0, 32, 32)


def test_nearest_pose_compares_only_joints_both_poses_have() -> None:
    q = sk.empty()
    q[:5] = [(10, 10, 1)] * 5
    far, near, partial = sk.empty(), sk.empty(), sk.empty()
    far[:5] = [(30, 30, 1)] * 5
    near[:5] = [(11, 10, 1)] * 5
    partial[:1] = [(10, 10, 1)]  # one joint, exact: must not beat a full near match
    assert nearest_pose(q, np.stack([far, near, partial])) == 1


def test_a_perfect_generator_beats_the_nearest_neighbour_and_a_blank_one_does_not(
    corpus: Corpus, tmp_path: Path
) -> None:
    perfect = score_generator(oracle(corpus), corpus, samples_path=tmp_path / "s.png")
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == 100.0
    assert perfect["beats_nn"] and perfect["nn_ssim"] < 1.0
    # The half of the held-out frames the trainer did not choose its checkpoint on.
    assert perfect["frames"] == corpus.count("holdout") // 2
    # Synthetic takes bring true ground truth of unseen poses.
    assert perfect["transfer_frames"] == 3 and perfect["transfer_ssim"] == pytest.approx(1.0)
    assert perfect["transfer_nn_ssim"] < 1.0
    assert "pose distance skipped" in perfect["notes"][0]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"

    blank = score_generator(lambda x: np.full_like(x, 128), corpus)
    assert not blank["beats_nn"] and blank["ssim"] < blank["nn_ssim"]


@pytest.mark.skipif(
    not (MODELS / "pose_landmark_full.tflite").exists(),
    reason="pose models not unpacked (make models)",
)
def test_pose_distance_runs_the_cpu_backend_on_generated_frames(tmp_path: Path) -> None:
    corpus = corpus_of(tmp_path, 64)
    perfect = score_generator(oracle(corpus), corpus, models_dir=MODELS, max_frames=3)
    assert "pose_error" in perfect and "real_pose_error" in perfect
    assert perfect["pose_detected"] == 1.0 and perfect["pose_error"] < 0.3
    # The oracle returns the real frames: its error is the backend's own error on them.
    assert perfect["pose_error"] == pytest.approx(perfect["real_pose_error"])
    assert perfect["nn_pose_error"] >= perfect["pose_error"]
    blank = score_generator(lambda x: np.full_like(x, 128), corpus, models_dir=MODELS, max_frames=3)
    assert blank["pose_detected"] <= perfect["pose_detected"]


def test_progress_plot_is_a_png(tmp_path: Path) -> None:
    history = [
        {"step": i, "t": i, "g": 5.0 - i / 10, "d": 1.2, "gan": 0.7, "l1": 0.3 - i / 100}
        for i in range(1, 20)
    ]
    evals = [{"step": i, "t": i, "ssim": 0.2 + i / 40, "l1": 0.2} for i in (0, 10, 19)]
    score = {"ssim": 0.7, "nn_ssim": 0.6, "psnr": 21.0}
    plot_progress(history, evals, score, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_checkpoint_is_chosen_on_held_out_frames_the_score_never_sees() -> None:
    from cloud_trainer.score import holdout_part

    for n in (2, 3, 17, 40, 200):
        select, score = holdout_part(n, 16, "select"), holdout_part(n, 48, "score")
        assert not (select & score).any(), n
        assert 0 < select.sum() <= 16 and 0 < score.sum() <= 48
    # Spread over the whole tail, not bunched at its start.
    idx = np.flatnonzero(holdout_part(200, 16, "select"))
    assert idx[0] == 0 and idx[-1] >= 190
    assert holdout_part(1, 16, "select").all() and holdout_part(1, 48, "score").all()
