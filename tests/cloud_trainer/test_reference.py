"""The reference library: a real pose pass over a synthetic video, QA report, corrections.

The reference video is rendered by the synthetic booth and encoded to H.264, so the
CPU BlazePose backend, the offline smoother and the glitch flags all run for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_trainer import cli
from cloud_trainer.config import LocalStorage
from cloud_trainer.reference import ReferenceLibrary, ReferenceNotFound, SyntheticSettings
from cloud_trainer.render import H264Writer, probe
from cloud_trainer.storage import create_blob_store
from edge_agent.config import CpuPose
from edge_agent.errors import BadInput
from edge_agent.synth import scene
from edge_agent.synth.appearance import Attendee
from edge_agent.synth.choreography import Dance
from edge_agent.synth.render import render

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SIZE, FPS = (320, 240), 15.0
GLITCH_FRAMES = (10, 11)  # the dancer teleports 0.9 m sideways for two frames

pytestmark = pytest.mark.skipif(
    not (MODELS / "pose_landmark_full.tflite").exists(), reason="run `make models` first"
)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    dancer = Attendee.from_seed(3)
    with H264Writer(d / "dance.mp4", FPS, SIZE) as w:
        for i, pose in enumerate(Dance.parse("wave+squat").poses(FPS, 1.6)):
            if i in GLITCH_FRAMES:
                pose = pose.moved(x=pose.x + 0.9)
            w.write(render(dancer, pose, SIZE, 0, i).rgb)
    with H264Writer(d / "empty.mp4", FPS, SIZE) as w:
        for _ in range(16):
            w.write(scene.backdrop(0, SIZE).plain)
    # Filmed from the waist up: the feet never in frame.
    with H264Writer(d / "waist_up.mp4", FPS, (SIZE[0], 128)) as w:
        for i, pose in enumerate(Dance.parse("wave").poses(FPS, 1.6)):
            w.write(np.ascontiguousarray(render(dancer, pose, SIZE, 0, i).rgb[:128]))
    with H264Writer(d / "blink.mp4", FPS, SIZE) as w:  # half a second
        for i, pose in enumerate(Dance.parse("wave").poses(FPS, 0.5)):
            w.write(render(dancer, pose, SIZE, 0, i).rgb)
    (d / "notes.mp4").write_text("these are my dance notes, not a video\n")
    return {
        "dance": d / "dance.mp4",
        "empty": d / "empty.mp4",
        "text": d / "notes.mp4",
        "waist_up": d / "waist_up.mp4",
        "blink": d / "blink.mp4",
    }


def _library(root: Path) -> ReferenceLibrary:
    return ReferenceLibrary(
        create_blob_store(LocalStorage(root=root)),
        pose_cfg=CpuPose(models_dir=MODELS, mode="tracking"),
        synthetic=SyntheticSettings(fps=10, seconds=1.2, size=(160, 120)),
    )


@pytest.fixture(scope="module")
def added(videos, tmp_path_factory):
    lib = _library(tmp_path_factory.mktemp("blobs"))
    return lib, lib.add(videos["dance"], "salsa")


def test_add_runs_pose_and_smoothing_on_every_frame_and_flags_the_glitch(added):
    lib, ref = added
    assert ref.version == 1 and len(ref) == 24
    assert ref.poses.shape == (24, 23, 3) and ref.masks is not None and ref.masks.any()
    assert ref.meta["detect_rate"] == 1.0 and ref.fps == FPS
    assert ref.flagged[GLITCH_FRAMES[0]]
    assert ref.flagged.sum() <= 4  # the rest of the dance is clean
    assert ref.status.startswith("needs review")
    # Stored and read back identically.
    again = lib.get("salsa")
    np.testing.assert_array_equal(again.poses, ref.poses)
    np.testing.assert_array_equal(again.flagged, ref.flagged)


def test_qa_report_has_trajectories_contact_sheet_and_summary(added):
    lib, ref = added
    d = "references/salsa/v1"
    png = cv2.imdecode(np.frombuffer(lib.store.get(f"{d}/qa/trajectories.png"), np.uint8), 1)
    sheet = cv2.imdecode(np.frombuffer(lib.store.get(f"{d}/qa/flagged.jpg"), np.uint8), 1)
    assert png.shape[0] > 300 and png.shape[1] > 600
    # One contact-sheet cell per flagged frame (up to 8 per row).
    assert sheet.shape[1] == 160 * min(8, int(ref.flagged.sum()))
    summary = json.loads(lib.store.get(f"{d}/qa/summary.json"))
    assert summary["frames"] == 24 and summary["fps"] == FPS and summary["version"] == 1
    assert summary["detect_rate"] == 1.0 and summary["flagged"] == int(ref.flagged.sum())
    text = lib.store.get(f"{d}/qa/summary.txt").decode()
    assert "salsa v1" in text and "needs review" in text
    template = lib.store.get(f"{d}/qa/corrections-template.yaml").decode()
    assert f"interpolate: [{GLITCH_FRAMES[0]}," in template
    assert lib.store.exists(f"{d}/thumbnail.jpg")


def test_correction_bumps_the_version_and_clears_the_flags(added, tmp_path):
    lib, ref = added
    bad = tmp_path / "bad.yaml"
    bad.write_text("- interpolate: [9, 12]\n- {frame: 99, joint: nose, x: 1, y: 1}\n")
    with pytest.raises(BadInput, match=r"bad.yaml line 2: frame 99 is out of range"):
        lib.correct("salsa", bad)
    assert lib.versions("salsa") == [1]

    flagged = np.flatnonzero(ref.flagged)
    good = tmp_path / "fix.yaml"
    good.write_text(
        "# Corrections for reference 'salsa' v1. Uncomment or edit, then run:\n"  # the template's
        f"- interpolate: [{flagged.min()}, {flagged.max()}]\n"
        "- {frame: 2, joint: left_wrist, x: 150, y: 90}\n"
        "- drop: [0, 0]\n"
    )
    v2 = lib.correct("salsa", good)
    assert v2.version == 2 and lib.versions("salsa") == [1, 2]
    # The same file again would drop frame 0 of v2 (v1's frame 1): refused, saying why.
    with pytest.raises(BadInput, match=r"made for salsa v1, but salsa is now at v2"):
        lib.correct("salsa", good)
    assert lib.versions("salsa") == [1, 2]
    assert len(v2) == 23 and v2.frame_index[0] == 1
    assert v2.flagged.sum() == 0 and v2.status == "ready"
    np.testing.assert_allclose(v2.poses[1, 9], (150, 90, 1))
    assert lib.get("salsa", 1).version == 1  # the old version stays
    assert "interpolate" in lib.store.get("references/salsa/v2/corrections.yaml").decode()
    status = lib.status("salsa")
    assert status["version"] == 2 and status["parent_version"] == 1
    assert status["corrected_frames"] == flagged.max() - flagged.min() + 2
    # The reference dancer's frames line up with the kept poses (for the side-by-side).
    frames = list(lib.source_frames(v2))
    assert len(frames) == 23 and frames[0].shape == (240, 320, 3)


def test_a_version_number_another_writer_took_is_skipped_not_overwritten(tmp_path):
    # Two writers read "latest is v1" at once; the other one reserved v2 first and is
    # still writing it. Ours must not write into v2 (a version made of both).
    lib = _library(tmp_path)
    lib.add_synthetic("synthetic:wave")
    assert lib.store.create("references/synthetic.wave/v2/claim.json", b"{}")
    lib.store.put("references/synthetic.wave/v2/poses.npz", b"the other writer's")
    ref = lib.apply_corrections("synthetic:wave", "- drop: [0, 1]\n")
    assert ref.version == 3 and ref.meta["parent_version"] == 1
    assert lib.store.get("references/synthetic.wave/v2/poses.npz") == b"the other writer's"
    assert lib.versions("synthetic:wave") == [1, 3]
    assert lib.get("synthetic:wave").version == 3 and len(lib.get("synthetic:wave")) == len(ref)
    # A version whose writer died before its meta.json stays taken: the next is v4.
    assert lib.add_synthetic("synthetic:wave").version == 4


def test_a_file_that_is_not_a_video_is_refused(videos, tmp_path):
    lib = _library(tmp_path)
    with pytest.raises(BadInput, match="is not a video"):
        lib.add(videos["text"], "notes")
    with pytest.raises(BadInput, match="no such file"):
        lib.add(tmp_path / "missing.mp4", "missing")
    assert lib.names() == []


def test_a_phone_video_with_a_display_rotation_is_read_upright(tmp_path):
    """Phones store the sensor's landscape buffer and a rotation players apply: the
    reference must see the dancer upright, at the size a player shows (the buffer here is
    what ffmpeg shows upright with ``rotate=270``)."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (apt) is missing; `make setup` installs it")
    portrait = (240, 320)
    sensor = tmp_path / "sensor.mp4"
    dancer = Attendee.from_seed(3)
    with H264Writer(sensor, FPS, (portrait[1], portrait[0])) as w:
        for i, pose in enumerate(Dance.parse("wave+squat").poses(FPS, 1.2)):
            rgb = render(dancer, pose, portrait, 0, i).rgb
            w.write(cv2.rotate(rgb, cv2.ROTATE_90_COUNTERCLOCKWISE))
    phone = tmp_path / "phone.mp4"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-i", str(sensor), "-c", "copy"]
        + ["-metadata:s:v:0", "rotate=270", str(phone)],
        check=True,
    )
    ref = _library(tmp_path / "blobs").add(phone, "phone")
    assert (ref.meta["width"], ref.meta["height"]) == portrait
    p = ref.poses
    seen = (p[:, 0, 2] > 0.3) & (p[:, 15, 2] > 0.3) & (p[:, 16, 2] > 0.3)
    assert seen.mean() > 0.8
    nose_above_ankles = p[seen, 0, 1] - (p[seen, 15, 1] + p[seen, 16, 1]) / 2
    assert np.median(nose_above_ankles) < -100  # upright: the head far above the feet
    # The side-by-side reads the dancer's frames again: upright too, at the size the
    # poses and framing were measured at (they came out sideways, and the render failed).
    frames = list(_library(tmp_path / "blobs").source_frames(ref))
    assert len(frames) == len(ref) and frames[0].shape == (portrait[1], portrait[0], 3)


def test_a_video_without_a_person_is_refused(videos, tmp_path):
    lib = _library(tmp_path)
    with pytest.raises(BadInput, match="no person found"):
        lib.add(videos["empty"], "empty")
    assert lib.names() == []


def test_a_reference_no_attendee_could_be_fitted_to_is_refused_when_added(videos, tmp_path):
    """Without a frame showing the head and both ankles, normalization fails: that used to
    be found out only after an attendee's whole training budget."""
    lib = _library(tmp_path)
    with pytest.raises(BadInput, match="head and both ankles"):
        lib.add(videos["waist_up"], "waist-up")
    with pytest.raises(BadInput, match=r"not a video of a dance \(at least 1 s\)"):
        lib.add(videos["blink"], "blink")
    assert lib.names() == []


def test_bad_names_and_unknown_references(tmp_path, videos):
    lib = _library(tmp_path)
    for name in ("Salsa!", "../x", "", "synthetic:warmup"):
        with pytest.raises(BadInput):
            lib.add(videos["dance"], name)
    with pytest.raises(ReferenceNotFound, match="no reference named 'tango'"):
        lib.get("tango")


def test_synthetic_dances_are_built_in_references(tmp_path):
    lib = _library(tmp_path)
    names = [r["name"] for r in lib.catalogue()]
    assert "synthetic:warmup" in names
    ref = lib.get("synthetic:warmup")  # built on first use, offline
    assert ref.version == 1 and len(ref) == 12 and ref.status == "ready"
    assert (ref.poses[:, :, 2] > 0).mean() > 0.9
    assert lib.names() == ["synthetic:warmup"]
    info = probe(lib.store.root / ref.meta["source_key"])
    assert info["codec"] == "h264" and info["frames"] == 12
    assert lib.get("synthetic:warmup").version == 1  # not built twice
    with pytest.raises(BadInput, match="unknown synthetic dance"):
        lib.get("synthetic:moonwalk")


def test_cli_show_and_correct(added, tmp_path, capsys):
    lib, _ = added
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(f"storage: {{type: local, root: {lib.store.root}}}\nmodels_dir: {MODELS}\n")
    assert (
        cli.main(["reference", "--config", str(cfg), "show", "salsa", "--qa", str(tmp_path / "qa")])
        == 0
    )
    out = capsys.readouterr().out
    assert "reference   salsa v" in out and "detected    100.0% of frames" in out
    assert (tmp_path / "qa" / "trajectories.png").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {frame: 1, joint: left_wirst, x: 1, y: 1}\n")
    assert cli.main(["reference", "--config", str(cfg), "correct", "salsa", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml line 1: unknown joint 'left_wirst' (did you mean left_wrist?)" in err
    assert cli.main(["reference", "--config", str(cfg), "list"]) == 0
    assert "salsa" in capsys.readouterr().out


def test_cli_lists_what_needs_review_and_removes_a_reference_for_good(videos, tmp_path, capsys):
    lib = _library(tmp_path / "blobs")
    lib.add(videos["dance"], "salsa")  # its glitch frames are flagged
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(f"storage: {{type: local, root: {lib.store.root}}}\nmodels_dir: {MODELS}\n")
    run = lambda *a: cli.main(["reference", "--config", str(cfg), *a])  # noqa: E731
    assert run("list") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("salsa"))
    assert "needs review:" in line and "flagged frames" in line
    (tmp_path / "afile").write_text("x")
    assert run("show", "salsa", "--qa", str(tmp_path / "afile")) == 2
    assert "is a file" in capsys.readouterr().err
    assert run("remove", "salsa") == 0
    assert "removed salsa" in capsys.readouterr().out
    assert list(lib.store.list("references/")) == []  # the dancer's video too
    assert run("remove", "salsa") == 2
    assert "no reference named 'salsa'" in capsys.readouterr().err


def test_a_variable_frame_rate_video_keeps_its_length(tmp_path):
    """2 s at 30 fps, then 2 s at 15 fps (a phone in dim light), in Matroska: its declared
    rate (of the first frames) made the dance 3 s long against 4 s of music."""
    from fractions import Fraction

    import av

    from cloud_trainer.reference import _decode, _video_info, mean_rate

    path = tmp_path / "vfr.mkv"
    pts_ms = [round(i * 1000 / 30) for i in range(60)] + [
        2000 + round(i * 1000 / 15) for i in range(30)
    ]
    with av.open(str(path), "w", format="matroska") as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(pts_ms):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 255, np.uint8), "rgb24")
            f.pts, f.time_base = t, Fraction(1, 1000)
            for pkt in s.encode(f):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    declared = _video_info(path).fps
    times: list = []
    n = sum(1 for _ in _decode(path, times))
    assert n == 90 and abs(n / declared - 4.0) > 0.5  # so the test could fail
    assert abs(n / mean_rate(times, declared) - 4.0) < 0.1
    assert mean_rate([0.0, 0.1, 0.2], 10.0) == 10.0  # agrees: the declared rate stands
    assert mean_rate([None, 0.1], 10.0) == 10.0
