"""Corpus: takes -> shards, the time split, tf.data, take directories and bad input."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_trainer.corpus import (
    Corpus,
    TakeData,
    TrainingFailed,
    build_corpus,
    mirror_from_store,
    mirror_to_store,
    split_indices,
)
from edge_agent import skeleton as sk

SIZE = 32


@pytest.fixture(scope="module")
def take() -> TakeData:
    return TakeData.from_synth(
        2, 5, seconds=4, fps=8, size=(64, 48), transfer_dance=6, transfer_frames=3
    )


@pytest.fixture(scope="module")
def corpus(take: TakeData, tmp_path_factory) -> Corpus:
    return build_corpus(
        [take],
        tmp_path_factory.mktemp("corpus"),
        size_px=SIZE,
        label_map="parts",
        holdout_fraction=0.1,
    )


@pytest.mark.parametrize("n", [2, 17, 24, 100, 451])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_split_holds_out_the_last_fraction_in_time_without_overlap(n: int, fraction: float) -> None:
    train, hold = split_indices(n, fraction, fps=30)
    assert set(train).isdisjoint(hold)
    assert len(hold) >= 1 and hold.stop == n
    assert len(hold) == int(np.ceil(n * fraction))
    assert train.start == 0 and (not train or train.stop <= hold.start)


@pytest.mark.parametrize("fps", [-30.0, 0.0, float("nan"), float("inf")])
def test_split_with_a_frame_rate_no_camera_has_still_never_overlaps(fps: float) -> None:
    train, hold = split_indices(40, 0.1, fps=fps)
    assert hold == range(36, 40)
    assert train.start == 0 and 0 < train.stop <= hold.start


def test_split_without_holdout_trains_on_everything() -> None:
    train, hold = split_indices(10, 0.0, fps=30)
    assert list(train) == list(range(10)) and len(hold) == 0


def test_corpus_holdout_is_the_tail_of_each_take_and_shares_no_frame(
    corpus: Corpus, take: TakeData
) -> None:
    _, train_takes, train_idx = corpus.metadata("train")
    _, hold_takes, hold_idx = corpus.metadata("holdout")
    assert len(train_idx) >= 16 and len(hold_idx) >= 1
    assert set(train_idx.tolist()).isdisjoint(hold_idx.tolist())
    assert train_idx.max() < hold_idx.min()
    assert hold_idx.max() == len(take) - 1
    info = corpus.takes[0]
    assert info["train"] == len(train_idx) and info["holdout"] == len(hold_idx)
    assert corpus.count("transfer") == 3


def test_corpus_records_decode_to_label_frame_and_pose(corpus: Corpus) -> None:
    ex = corpus.examples("holdout")
    assert ex.labels.shape == (len(ex), SIZE, SIZE, 3) and ex.frames.dtype == np.uint8
    assert ex.poses.shape == (len(ex), sk.NUM_JOINTS, 3)
    # Parts maps: background black, person coloured; the frame is the booth, not black.
    assert (ex.labels[0].sum(-1) == 0).mean() > 0.4
    assert (ex.labels[0].sum(-1) > 0).mean() > 0.03
    assert ex.frames[0].mean() > 60


def test_dataset_streams_batches_in_unit_range(corpus: Corpus) -> None:
    label, frame = next(iter(corpus.dataset(4)))
    assert tuple(label.shape) == (4, SIZE, SIZE, 3) and tuple(frame.shape) == (4, SIZE, SIZE, 3)
    assert float(label.numpy().min()) >= -1.0 and float(frame.numpy().max()) <= 1.0


def test_examples_decode_only_the_selected_records(corpus: Corpus) -> None:
    n = corpus.count("train")
    keep = np.zeros(n, bool)
    keep[[0, 5]] = True
    ex = corpus.examples("train", keep=keep)
    assert len(ex) == 2 and ex.indices.tolist() == [0, 5]


def test_corpus_verify_names_a_corrupt_shard(take: TakeData, tmp_path: Path) -> None:
    c = build_corpus([take], tmp_path, size_px=SIZE, label_map="skeleton", holdout_fraction=0.1)
    shard = Path(c.files("train")[0])
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    shard.write_bytes(bytes(data))
    with pytest.raises(TrainingFailed, match=r"train-00000\.tfrecord is corrupt"):
        Corpus.open(tmp_path).verify()


def test_corpus_verify_notices_a_truncated_shard(take: TakeData, tmp_path: Path) -> None:
    c = build_corpus([take], tmp_path, size_px=SIZE, label_map="skeleton", holdout_fraction=0.1)
    shard = Path(c.files("train")[0])
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(TrainingFailed, match="corrupt|truncated"):
        Corpus.open(tmp_path).verify()


def test_empty_take_fails_with_a_readable_reason(tmp_path: Path) -> None:
    empty = TakeData("empty-take", [], np.zeros((0, sk.NUM_JOINTS, 3), np.float32))
    with pytest.raises(TrainingFailed, match="empty-take is empty"):
        build_corpus([empty], tmp_path, size_px=SIZE, label_map="skeleton", holdout_fraction=0.1)


def test_tiny_take_fails_with_a_readable_reason(take: TakeData, tmp_path: Path) -> None:
    tiny = TakeData("tiny", take.frames[:8], take.poses[:8], fps=8)
    with pytest.raises(TrainingFailed, match="tiny is too short to train on"):
        build_corpus([tiny], tmp_path, size_px=SIZE, label_map="skeleton", holdout_fraction=0.1)


def test_take_without_a_person_fails_with_a_readable_reason(take: TakeData, tmp_path: Path) -> None:
    nobody = TakeData("nobody", take.frames, np.zeros_like(take.poses), fps=8)
    with pytest.raises(TrainingFailed, match="no person detected in take nobody"):
        build_corpus([nobody], tmp_path, size_px=SIZE, label_map="skeleton", holdout_fraction=0.1)


def test_an_unusable_camera_take_is_skipped_when_another_is_usable(
    take: TakeData, tmp_path: Path
) -> None:
    nobody = TakeData("cam1-empty-room", take.frames, np.zeros_like(take.poses), fps=8)
    c = build_corpus(
        [nobody, take], tmp_path, size_px=SIZE, label_map="skeleton", holdout_fraction=0.1
    )
    assert [t["name"] for t in c.takes] == [take.name]
    assert c.manifest["skipped"][0]["take"] == "cam1-empty-room"
    assert "no person detected" in c.manifest["skipped"][0]["reason"]
    _, takes, _ = c.metadata("train")
    assert set(takes.tolist()) == {0}  # records point at the manifest's takes


def test_take_whose_frames_do_not_decode_fails_as_corrupt(take: TakeData, tmp_path: Path) -> None:
    ok = cv2.imencode(".jpg", take.frames[0])[1].tobytes()
    frames = [ok] + [b"\xff\xd8 not a jpeg" for _ in range(len(take) - 1)]
    broken = TakeData("broken", frames, take.poses, fps=8)
    with pytest.raises(TrainingFailed, match="do not decode"):
        build_corpus([broken], tmp_path, size_px=SIZE, label_map="skeleton", holdout_fraction=0.1)


def test_parts_without_masks_or_segmenter_fails_with_a_readable_reason(
    take: TakeData, tmp_path: Path
) -> None:
    no_masks = TakeData("maskless", take.frames, take.poses, fps=8)
    with pytest.raises(TrainingFailed, match="no person masks"):
        build_corpus([no_masks], tmp_path, size_px=SIZE, label_map="parts", holdout_fraction=0.1)


def test_parts_masks_come_from_the_segmenter_when_a_take_has_none(
    take: TakeData, tmp_path: Path
) -> None:
    calls = []

    class Oracle:
        def mask(self, rgb: np.ndarray) -> np.ndarray:
            calls.append(rgb.shape)
            i = next(i for i, f in enumerate(take.frames) if f is rgb)
            return take.masks[i].astype(np.float32)

    no_masks = TakeData("maskless", take.frames, take.poses, fps=8)
    c = build_corpus(
        [no_masks],
        tmp_path,
        size_px=SIZE,
        label_map="parts",
        holdout_fraction=0.1,
        segmenter=Oracle,
    )
    assert len(calls) == c.count("train") + c.count("holdout")


def test_synthetic_take_directory_loads_frames_poses_and_masks(tmp_path: Path) -> None:
    from edge_agent.synth.take import write_take

    write_take(tmp_path / "take", attendee=1, dance=2, seconds=1.0, fps=10, size=(64, 48))
    take = TakeData.from_take_dir(tmp_path / "take")
    assert len(take) == 10 and take.poses.shape == (10, sk.NUM_JOINTS, 3)
    assert take.masks is not None and take.masks[0].shape == (48, 64)
    assert take.rgb(0).shape == (48, 64, 3) and take.fps == 10


def test_missing_take_directory_fails_with_a_readable_reason(tmp_path: Path) -> None:
    with pytest.raises(TrainingFailed, match="does not exist"):
        TakeData.from_take_dir(tmp_path / "nope")


def test_corpus_round_trips_through_the_blob_store(corpus: Corpus, tmp_path: Path) -> None:
    from cloud_trainer.storage.local import LocalBlobStore

    store = LocalBlobStore(tmp_path / "blobs")
    sent = mirror_to_store(corpus.root, store, "sessions/s1/corpus")
    assert sent == len(list(corpus.root.iterdir()))
    assert mirror_from_store(store, "sessions/s1/corpus", tmp_path / "copy") == sent
    copy = Corpus.open(tmp_path / "copy")
    copy.verify()
    assert copy.count("train") == corpus.count("train")


def test_mirroring_uploads_indexes_after_their_data_and_the_jobs_record_last(
    tmp_path: Path,
) -> None:
    # A worker killed mid-upload must not leave `ckpt/checkpoint` naming files not yet sent.
    from cloud_trainer.storage.local import LocalBlobStore

    class Recording(LocalBlobStore):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.order: list[str] = []

        def put_file(self, key: str, path: str, content_type: str | None = None) -> None:
            self.order.append(key.split("/", 1)[1])
            super().put_file(key, path, content_type)

    local = tmp_path / "checkpoints"
    for name in ("best/checkpoint", "best/ckpt-4.index", "ckpt/checkpoint", "ckpt/ckpt-4.index"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(name)
    (local / "ckpt" / "ckpt-4.data-00000-of-00001").write_text("weights")
    (local / "state.json").write_text('{"best": {"step": 4}}')
    store = Recording(tmp_path / "blobs")
    mirror_to_store(local, store, "ck", record="state.json")
    # The job's record last: a kill before it leaves the store's state behind its
    # checkpoints (harmless), never naming a best checkpoint the store lacks.
    assert store.order[-3:] == ["best/checkpoint", "ckpt/checkpoint", "state.json"]


def test_a_download_killed_midway_leaves_no_index_naming_missing_files(
    corpus: Corpus, tmp_path: Path
) -> None:
    """Downloaded in name order, corpus.json came before its shards: a worker killed
    midway left an index without its shards, and the next attempt failed the session
    ('corpus shard ... is missing') though the corpus could be built again."""
    from cloud_trainer.storage.local import LocalBlobStore

    class Killed(Exception):
        pass

    class DiesMidway(LocalBlobStore):
        fetched = 0

        def download(self, key: str, path: str) -> None:
            if self.fetched == 1:
                raise Killed()
            self.fetched += 1
            super().download(key, path)

    store = DiesMidway(tmp_path / "blobs")
    assert mirror_to_store(corpus.root, store, "c") > 2
    with pytest.raises(Killed):
        mirror_from_store(store, "c", tmp_path / "copy")
    assert not Corpus.exists(tmp_path / "copy")  # so the next attempt fetches it again


MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.skipif(
    not (MODELS / "selfie_segmentation.tflite").exists(), reason="models not unpacked (make models)"
)
def test_parts_masks_from_selfie_segmentation_cover_the_person(
    take: TakeData, tmp_path: Path
) -> None:
    from cloud_trainer.corpus import default_segmenter

    no_masks = TakeData("maskless", take.frames, take.poses, fps=8)
    c = build_corpus(
        [no_masks],
        tmp_path,
        size_px=SIZE,
        label_map="parts",
        holdout_fraction=0.1,
        segmenter=lambda: default_segmenter(MODELS),
    )
    truth = build_corpus(
        [take], tmp_path / "truth", size_px=SIZE, label_map="parts", holdout_fraction=0.1
    )
    seg, ref = c.examples("holdout").labels, truth.examples("holdout").labels
    person_seg, person_ref = seg.sum(-1) > 0, ref.sum(-1) > 0
    iou = (person_seg & person_ref).sum() / max(1, (person_seg | person_ref).sum())
    assert iou > 0.5
