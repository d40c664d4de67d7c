"""The renderer: a real exported generator (64 px, the trainer's export) to H.264 MP4s."""

from __future__ import annotations

import json
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_trainer import labelmap, normalize, render
from cloud_trainer.config import LocalStorage
from cloud_trainer.model import ModelSpec, build_generator
from cloud_trainer.reference import ReferenceLibrary, SyntheticSettings
from cloud_trainer.storage import create_blob_store
from cloud_trainer.train import export_generator
from edge_agent import skeleton as sk
from edge_agent.errors import BadInput
from edge_agent.synth.appearance import Attendee
from edge_agent.synth.choreography import Dance
from edge_agent.synth.render import render as synth_render

SIZE = 64
TAKE_SIZE = (320, 240)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """The trainer's own export of an untrained 64 px generator (its weights do not matter)."""
    spec = ModelSpec.for_size(SIZE)
    out = tmp_path_factory.mktemp("model") / "export"
    model = types.SimpleNamespace(spec=spec, generator=build_generator(spec))
    export_generator(model, out, label_map="skeleton", meta={"framing": []})
    return out


@pytest.fixture(scope="module")
def generator(export_dir) -> render.Generator:
    return render.load_generator(export_dir, label_map="skeleton", engine="tflite")


def _relabelled(export_dir: Path, dest: Path, label_map: str) -> Path:
    """The same weights, recorded as trained on another label map."""
    dest.mkdir()
    for name in ("saved_model", "generator.tflite"):
        (dest / name).symlink_to(export_dir / name)
    meta = json.loads((export_dir / "generator.json").read_text())
    meta["label_map"] = label_map
    (dest / "generator.json").write_text(json.dumps(meta))
    return dest


def _crop_poses(n: int) -> np.ndarray:
    dance = Dance.parse("wave+squat").poses(10.0, n / 10.0)
    a = Attendee.from_seed(4)
    full = np.stack([synth_render(a, p, TAKE_SIZE, 0, i).keypoints for i, p in enumerate(dance)])
    framing = labelmap.Framing.from_poses(full, *TAKE_SIZE)
    return np.stack([framing.to_crop(s, SIZE) for s in full])


def test_render_writes_playable_h264_with_the_right_frames_and_fps(generator, tmp_path):
    poses = _crop_poses(20)
    panels = [np.full((SIZE, SIZE, 3), 90, np.uint8)] * 20
    result = render.render_video(generator, poses, 12.5, tmp_path, reference_frames=panels, batch=8)
    info = render.probe(result.video_path)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["frames"] == 20 and info["fps"] == 12.5
    assert (info["width"], info["height"]) == (SIZE, SIZE)
    assert info["colorspace"] == "smpte170m"  # tagged as converted: no player guesses
    head = result.video_path.read_bytes()
    assert 0 <= head.find(b"moov") < head.find(b"mdat")  # +faststart: index first
    sbs = render.probe(result.side_by_side_path)
    assert (sbs["width"], sbs["height"], sbs["frames"]) == (2 * SIZE, SIZE, 20)
    poster = cv2.imdecode(np.frombuffer(result.poster_path.read_bytes(), np.uint8), 1)
    assert poster is not None and poster.shape[1] >= render.POSTER_MIN_PX
    # The side-by-side's right half is the reference panel.
    frame = next(render.iter_decoded(result.side_by_side_path))
    assert abs(float(frame[:, SIZE + 4 : -4].mean()) - 90) < 6


def test_both_engines_give_the_same_frames(export_dir):
    labels = np.stack([labelmap.render_skeleton(p, SIZE) for p in _crop_poses(4)])
    saved = render.load_generator(export_dir, engine="savedmodel").predict(labels)
    lite = render.load_generator(export_dir, engine="tflite").predict(labels)
    assert saved.shape == lite.shape == (4, SIZE, SIZE, 3) and saved.dtype == np.uint8
    assert np.abs(saved.astype(int) - lite.astype(int)).max() <= 2
    assert render.load_generator(export_dir, engine="auto").engine in render.ENGINES


def test_a_generator_for_another_label_map_is_refused(export_dir, tmp_path):
    parts = _relabelled(export_dir, tmp_path / "parts", "parts")
    with pytest.raises(render.GeneratorMismatch, match="trained on 'parts' label maps"):
        render.load_generator(parts, label_map="skeleton")
    with pytest.raises(BadInput, match="not an exported generator"):
        render.load_generator(tmp_path)
    # A parts generator needs masks the caller did not give.
    gen = render.load_generator(parts, engine="tflite")
    with pytest.raises(render.GeneratorMismatch, match="person masks"):
        render.render_video(gen, _crop_poses(2), 10.0, tmp_path / "out")


class _BrokenEngine:
    takes_uint8 = True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory (simulated)")


def test_a_failing_generator_stops_the_pipeline_with_its_error(tmp_path):
    bad = render.Generator("skeleton", SIZE, "broken", _BrokenEngine())
    with pytest.raises(RuntimeError, match="simulated"):
        render.render_video(bad, _crop_poses(20), 10.0, tmp_path, batch=4)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ReferenceLibrary:
    store = create_blob_store(LocalStorage(root=tmp_path_factory.mktemp("blobs")))
    return ReferenceLibrary(store, synthetic=SyntheticSettings(fps=10, seconds=2, size=(320, 240)))


def _take(seed: int = 5) -> np.ndarray:
    a = Attendee.from_seed(seed)
    poses = Dance.parse("march").poses(10.0, 1.0)
    return np.stack(
        [
            synth_render(a, p.moved(x=0.3, z=0.4), TAKE_SIZE, 0, i, noise=False).keypoints
            for i, p in enumerate(poses)
        ]
    )


def test_render_session_stores_video_poster_and_side_by_side(
    generator, library, tmp_path, monkeypatch
):
    ref = library.get("synthetic:warmup")
    take = _take()
    framing = labelmap.Framing.from_poses(take, *TAKE_SIZE)
    made_in = []
    real_render_video = render.render_video

    def spy(generator, crop, fps, out_dir, **kw):
        made_in.append(Path(out_dir))
        return real_render_video(generator, crop, fps, out_dir, **kw)

    monkeypatch.setattr(render, "render_video", spy)
    fetched_to = []
    real_download = library.store.download

    def download(key, path):
        fetched_to.append(Path(path))
        return real_download(key, path)

    monkeypatch.setattr(library.store, "download", download)
    scratch = tmp_path / "job-s1"
    keys = render.render_session(
        library.store, "s1", generator, ref, take, framing, library=library, scratch_dir=scratch
    )
    # Made in the job's directory (which the worker sweeps), and cleaned up after.
    assert made_in and made_in[0].parent == scratch and list(scratch.iterdir()) == []
    # The reference's source video too (it can be large; the system's /tmp is often small).
    assert len(fetched_to) == 1 and fetched_to[0].parent.parent == scratch
    assert keys == {
        "video_key": "sessions/s1/video/final.mp4",
        "poster_key": "sessions/s1/video/poster.jpg",
        "side_by_side_key": "sessions/s1/video/side-by-side.mp4",
    }
    info = render.probe(library.store.root / keys["video_key"])
    assert info["frames"] == len(ref) == 20 and info["fps"] == ref.fps == 10
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert render.probe(library.store.root / keys["side_by_side_key"])["frames"] == 20
    assert library.store.size(keys["poster_key"]) > 1000


def test_a_reference_whose_source_video_is_gone_still_renders_the_attendees_video(
    generator, library, caplog
):
    """Only the side-by-side and the music come from the source: a reference removed
    while a job trained used to fail the job at rendering, after its whole budget."""
    ref = library.get("synthetic:warmup")
    library.store.delete(ref.meta["source_key"])
    take = _take()
    with caplog.at_level("WARNING", logger="cloud_trainer.render"):
        keys = render.render_session(
            library.store,
            "s1",
            generator,
            ref,
            take,
            labelmap.Framing.from_poses(take, *TAKE_SIZE),
            library=library,
        )
    assert keys["side_by_side_key"] is None
    assert render.probe(library.store.root / keys["video_key"])["frames"] == len(ref)
    assert "source video is gone" in caplog.text


def test_parts_masks_move_with_the_normalized_pose(library):
    ref = library.get("synthetic:warmup")
    take = _take(6)
    framing = labelmap.Framing.from_poses(take, *TAKE_SIZE)
    norm = normalize.fit(ref.poses, take)
    crops = [framing.to_crop(p, SIZE) for p in norm.apply(ref.poses)]
    torso = [sk.INDEX[n] for n in ("left_shoulder", "right_shoulder", "left_hip", "right_hip")]
    inside = []
    for crop, mask in zip(crops, render.warp_masks(ref, norm, framing, SIZE), strict=True):
        xy = np.clip(np.round(crop[torso, :2]).astype(int), 0, SIZE - 1)
        inside.extend(mask[xy[:, 1], xy[:, 0]])
    assert np.mean(inside) > 0.9


@pytest.mark.parametrize(
    ("fps", "exact"),
    [(29.97, (30000, 1001)), (59.94, (60000, 1001)), (23.976, (24000, 1001)), (12.5, (25, 2))]
    + [(30.0, (30, 1)), (120.0, (120, 1))],
)
def test_frame_rates_become_the_exact_fraction_they_stand_for(fps, exact):
    f = render.fps_fraction(fps)
    assert (f.numerator, f.denominator) == exact


def _with_tone(path: Path, seconds: float, hz: float = 440.0) -> None:
    """An MP4 with a video track and a stereo sine tone (a reference with its music)."""
    import av

    rate = 44_100
    with av.open(str(path), "w", format="mp4") as out:
        v = out.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=rate, layout="stereo")
        for i in range(round(seconds * 10)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 255, np.uint8), "rgb24")
            frame.pts = i
            for pkt in v.encode(frame):
                out.mux(pkt)
        t = np.arange(round(seconds * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            chunk = np.stack([tone[start : start + 1024]] * 2)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), "fltp", "stereo")
            frame.sample_rate, frame.pts = rate, start
            for pkt in a.encode(frame):
                out.mux(pkt)
        for stream in (v, a):
            for pkt in stream.encode(None):
                out.mux(pkt)


def test_the_reference_music_is_under_the_rendered_video_and_cut_to_it(tmp_path):
    import av

    video = tmp_path / "final.mp4"
    with render.H264Writer(video, 10, (64, 48)) as w:
        for i in range(20):  # 2 s
            w.write(np.full((48, 64, 3), 7 * i, np.uint8))
    before = render.probe(video)
    source = tmp_path / "reference.mp4"
    _with_tone(source, seconds=4.0)
    assert render.add_audio(video, source, start_s=1.0, duration_s=2.0)
    with av.open(str(video)) as f:
        assert [s.type for s in f.streams] == ["video", "audio"]
        audio = f.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.rate == render.AUDIO_RATE
        samples = sum(fr.samples for fr in f.decode(audio))
    assert abs(samples / render.AUDIO_RATE - 2.0) < 0.05  # cut to the video
    after = render.probe(video)
    assert (after["frames"], after["codec"], after["fps"]) == (
        before["frames"],
        before["codec"],
        before["fps"],
    )
    # A reference without music leaves the video as it was.
    silent = tmp_path / "silent.mp4"
    with render.H264Writer(silent, 10, (64, 48)) as w:
        w.write(np.zeros((48, 64, 3), np.uint8))
    kept = video.read_bytes()
    assert not render.add_audio(video, silent, start_s=0.0, duration_s=2.0)
    assert video.read_bytes() == kept
