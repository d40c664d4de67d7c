"""The synthetic booth: determinism, ground truth, occlusion, the camera and ``booth synth``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cloud_trainer.cli import main
from edge_agent import skeleton as sk
from edge_agent.config import SyntheticSource
from edge_agent.synth import (
    PART,
    Attendee,
    BodyPose,
    Dance,
    SyntheticCamera,
    forward_kinematics,
    mirror,
    read_mp4_jpegs,
    read_truth,
    render,
)
from edge_agent.synth.body import sole_corners

SMALL = (128, 96)


def _crossed_arms() -> BodyPose:
    """Left forearm across the belly in front of the torso, right forearm behind the back."""
    return BodyPose.neutral().with_angles(
        l_shoulder_flex=0.35,
        l_shoulder_abd=0.2,
        l_elbow=1.9,
        l_shoulder_twist=-1.2,
        r_shoulder_flex=-0.5,
        r_shoulder_abd=0.1,
        r_elbow=1.9,
        r_shoulder_twist=-1.6,
    )


def test_same_seeds_render_identical_bytes():
    pose = Dance.from_seed(4).pose(2.5)
    a = render(Attendee.from_seed(3), pose, SMALL, viewpoint=1, frame_index=7)
    b = render(Attendee.from_seed(3), Dance.from_seed(4).pose(2.5), SMALL, 1, frame_index=7)
    assert a.rgb.tobytes() == b.rgb.tobytes()
    assert a.parts.tobytes() == b.parts.tobytes()
    assert np.array_equal(a.keypoints, b.keypoints)


def test_camera_jpegs_are_identical_across_instances():
    cfg = SyntheticSource(attendee=5, dance=2, size=(96, 64), fps=20)
    one, two = SyntheticCamera(cfg, 0.25), SyntheticCamera(cfg, 0.25)
    assert [one.jpeg(i) for i in range(5)] == [two.jpeg(i) for i in range(5)]


def test_different_attendee_seeds_give_visibly_different_attendees():
    people = [Attendee.from_seed(s) for s in range(1, 7)]
    looks = {p.appearance for p in people}
    assert len(looks) == len(people)
    heights = {round(p.proportions.height_m, 3) for p in people}
    assert len(heights) == len(people)
    frames = [render(p, BodyPose.neutral(), SMALL, noise=False) for p in people]
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            both = frames[i].mask | frames[j].mask
            diff = np.abs(frames[i].rgb.astype(int) - frames[j].rgb.astype(int))[both].mean()
            assert diff > 12, (i, j, diff)


@pytest.mark.parametrize("dance", ["1", "2", "warmup", "turn+jump", "stepout"])
def test_every_visible_keypoint_lies_on_the_person_mask(dance):
    choreo = Dance.parse(dance)
    seen = 0
    for k, seed in enumerate((1, 4, 9)):
        for t in np.arange(0.0, 12.0, 0.7) + 0.1 * k:
            f = render(Attendee.from_seed(seed), choreo.pose(t), SMALL, viewpoint=k % 3)
            xs, ys = f.keypoints[f.visible, 0].astype(int), f.keypoints[f.visible, 1].astype(int)
            assert f.mask[ys, xs].all()
            assert (f.keypoints[~f.visible] == 0).all()
            assert (f.keypoints[f.visible, 2] == 1).all()
            seen += int(f.visible.sum())
    assert seen > 100


def test_forearm_in_front_of_torso_is_visible_and_behind_it_occluded():
    f = render(Attendee.from_seed(1), _crossed_arms(), (256, 192), noise=False)
    lw, rw = sk.INDEX["left_wrist"], sk.INDEX["right_wrist"]
    assert f.in_frame[lw] and f.in_frame[rw]
    assert f.visible[lw], "the forearm in front of the belly hides nothing of the wrist"
    assert not f.visible[rw] and f.occluded[rw], "the torso hides the wrist behind the back"
    # The hidden wrist keeps its true position, where the body in front covers it.
    x, y = f.projected[rw].astype(int)
    own = {PART[n] for n in PART if n.startswith(("right_lower_arm", "right_hand"))}
    assert f.mask[y, x] and f.parts[y, x] not in own
    # Seen from behind, the roles swap.
    back = render(Attendee.from_seed(1), _crossed_arms().moved(yaw=math.pi), (256, 192))
    assert back.visible[rw] and not back.visible[lw]


def test_face_turned_away_is_occluded_but_in_frame():
    f = render(Attendee.from_seed(2), BodyPose.neutral().moved(yaw=math.pi), SMALL)
    face = [sk.INDEX[n] for n in ("nose", "left_eye", "right_eye")]
    assert f.in_frame[face].all() and not f.visible[face].any()
    front = render(Attendee.from_seed(2), BodyPose.neutral(), SMALL)
    assert front.visible[face].all()


def test_part_map_puts_the_persons_left_on_the_image_right():
    f = render(Attendee.from_seed(3), BodyPose.neutral(), (256, 192), noise=False)
    assert set(np.unique(f.parts)) <= set(range(25))
    assert np.array_equal(f.mask, f.parts > 0)

    def cx(name: str) -> float:
        return float(np.nonzero(f.parts == PART[name])[1].mean())

    assert cx("left_upper_arm_front") > cx("torso_front") > cx("right_upper_arm_front")
    assert cx("left_foot") > cx("right_foot")
    assert cx("left_face") > cx("right_face")


def test_any_attendee_performs_any_pose_with_their_own_bones():
    pose = Dance.from_seed(6).pose(3.3)
    tall, short = Attendee.from_seed(0), Attendee.from_seed(3)
    assert tall.proportions.height_m - short.proportions.height_m > 0.1
    for person in (tall, short):
        body = forward_kinematics(person.proportions, pose.moved(lift=0.0))
        lowest = min(sole_corners(body, s)[:, 1].min() for s in ("l", "r"))
        assert abs(lowest) < 1e-9, "feet rest on the floor"
    a = render(tall, pose, SMALL)
    b = render(short, pose, SMALL)
    nose = sk.INDEX["nose"]
    assert a.projected[nose, 1] < b.projected[nose, 1]  # the taller head is higher


def test_two_viewpoints_see_the_booth_from_either_side():
    pose = BodyPose.neutral()
    person = Attendee.from_seed(1)
    views = [render(person, pose, (256, 192), viewpoint=v) for v in (0, 1, 2)]
    assert views[1].rgb.tobytes() != views[2].rgb.tobytes()
    assert all(v.visible.sum() >= 19 for v in views)

    def nose_offset(f) -> float:
        shoulders = f.projected[[sk.INDEX["left_shoulder"], sk.INDEX["right_shoulder"]], 0]
        return float(f.projected[sk.INDEX["nose"], 0] - shoulders.mean())

    # The face stands in front of the shoulders, so parallax moves it opposite ways.
    assert nose_offset(views[1]) * nose_offset(views[2]) < 0
    with pytest.raises(ValueError):
        render(person, pose, SMALL, viewpoint=99)


def test_stepout_leaves_the_frame_while_the_wall_shadow_stays():
    dance = Dance.from_name("stepout")
    step_out = dance.spans[1]  # the first repetition, after the opening groove
    assert step_out.name == "stepout"
    empty_with_shadow = 0
    for t in np.arange(step_out.start_s, step_out.start_s + step_out.duration_s, 0.25):
        f = render(Attendee.from_seed(2), dance.pose(t), SMALL)
        assert f.shadow_mask is not None, "the spotlight shines throughout a step-out"
        if not f.in_frame.any():
            assert f.shadow_mask.sum() > 0.02 * f.mask.size
            assert not f.visible.any() and f.mask.mean() < 0.005  # a sliver of sleeve at most
            empty_with_shadow += 1
    assert empty_with_shadow >= 3


def test_hard_shadow_follows_the_shadow_option():
    person = Attendee.from_seed(1)
    hard = render(person, BodyPose.neutral(), SMALL, shadow="hard")
    assert hard.shadow_mask.any() and not (hard.shadow_mask & hard.mask).any()
    assert render(person, BodyPose.neutral(), SMALL, shadow="soft").shadow_mask is None
    with pytest.raises(ValueError):
        render(person, BodyPose.neutral(), SMALL, shadow="dramatic")


def test_pose_vectors_round_trip_and_mirroring_is_an_involution():
    pose = Dance.from_seed(3).pose(4.2).moved(x=0.3, yaw=0.4)
    again = BodyPose.from_vector(pose.as_vector())
    assert np.array_equal(again.as_vector(), pose.as_vector())
    twice = mirror(mirror(pose))
    assert np.allclose(twice.as_vector(), pose.as_vector())
    assert mirror(pose)["l_elbow"] == pose["r_elbow"]


def test_dances_are_deterministic_and_named_moves_are_checked():
    assert len(Dance.from_seed(1).poses(30, 2)) == 60
    a, b = Dance.from_seed(8).poses(10, 5), Dance.from_seed(8).poses(10, 5)
    assert all(np.array_equal(p.as_vector(), q.as_vector()) for p, q in zip(a, b, strict=True))
    assert (
        Dance.from_seed(8).pose(3.0).as_vector().tolist()
        != Dance.from_seed(9).pose(3.0).as_vector().tolist()
    )
    assert Dance.parse("wave+squat").name == "wave+squat"
    with pytest.raises(ValueError, match="unknown dance move"):
        Dance.parse("moonwalk")


class _FakeClock:
    """Monotonic nanoseconds that advance only when slept on or read (a spin costs 10 µs)."""

    def __init__(self) -> None:
        self.now = 5_000_000_000

    def clock(self) -> int:
        self.now += 10_000
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


def test_camera_replays_on_absolute_deadlines_without_drift():
    fake = _FakeClock()
    cfg = SyntheticSource(attendee=1, dance=1, size=(64, 48), fps=120)
    cam = SyntheticCamera(cfg, 0.1, clock_ns=fake.clock, sleep=fake.sleep)
    cam.prerender()
    got, released = [], []
    for frame in cam.frames():
        got.append(frame)
        released.append(fake.now)
        if frame.seq == 3:
            fake.now += 30_000_000  # the consumer stalls for 30 ms (3.6 frame periods)
    assert [f.seq for f in got] == list(range(12))
    start = got[0].capture_ts_ns
    for f, when in zip(got, released, strict=True):
        assert f.capture_ts_ns == start + round(f.seq * 1e9 / 120)
        assert when >= f.capture_ts_ns  # never early
    # After the stall, late frames go out at once and the schedule catches up.
    assert released[-1] - got[-1].capture_ts_ns < 100_000
    assert got[5].jpeg == cam.jpeg(5)
    assert cam.granted().fps == 120 and (cam.granted().width, cam.granted().height) == (64, 48)


def test_a_reader_that_stalls_past_the_driver_buffers_loses_the_frames_that_found_them_full():
    fake = _FakeClock()
    cfg = SyntheticSource(attendee=1, dance=1, size=(64, 48), fps=100, device_buffers=4)
    cam = SyntheticCamera(cfg, 0.2, clock_ns=fake.clock, sleep=fake.sleep)
    got = []
    for frame in cam.frames():
        got.append(frame.seq)
        if frame.seq == 2:
            fake.now += 100_000_000  # 10 frame periods: frames 3..12 arrive meanwhile
    # 3..6 waited in the four buffers; 7..12 found them full and are gone, as on a device.
    assert got == [0, 1, 2, 3, 4, 5, 6, *range(13, 20)]
    assert cam.lost_frames == 6
    assert [f.seq for f in cam.frames()] == list(range(20)) and cam.lost_frames == 0


def test_camera_ground_truth_matches_its_frames():
    cfg = SyntheticSource(attendee=2, dance=3, size=(64, 48), fps=10)
    cam = SyntheticCamera(cfg, 0.5)
    cam.prerender()
    gt = cam.ground_truth(3)
    assert np.array_equal(gt.keypoints, cam.keypoints[3])
    assert gt.rgb.shape == (48, 64, 3)


def test_cli_writes_a_take_whose_mp4_holds_the_cameras_exact_jpegs(tmp_path, capsys):
    out = tmp_path / "take"
    args = ["synth", "--attendee", "4", "--dance", "2", "--seconds", "0.5", "--fps", "10"]
    assert main([*args, "--size", "96x64", "--out", str(out), "--viewpoint", "1"]) == 0
    assert "wrote 5 frames" in capsys.readouterr().out
    for name in ("frames.mp4", "truth.npz", "contact.png", "take.json"):
        assert (out / name).stat().st_size > 0
    cam = SyntheticCamera(
        SyntheticSource(attendee=4, dance=2, size=(96, 64), fps=10, viewpoint=1), 0.5
    )
    assert read_mp4_jpegs(out / "frames.mp4") == [cam.jpeg(i) for i in range(5)]
    truth = read_truth(out / "truth.npz")
    cam.prerender()
    assert np.array_equal(truth["keypoints"], cam.keypoints)
    assert truth["mask"].shape == truth["parts"].shape == (5, 64, 96)
    assert np.array_equal(truth["mask"], truth["parts"] > 0)
    assert truth["timestamps_ns"].tolist() == [i * 100_000_000 for i in range(5)]
    meta = json.loads((out / "take.json").read_text())
    assert meta["frames"] == 5 and meta["attendee"] == 4 and meta["size"] == [96, 64]


def test_cli_accepts_dance_names(tmp_path, capsys):
    out = tmp_path / "named"
    args = ["synth", "--dance", "warmup", "--seconds", "0.2", "--fps", "10", "--size", "64x48"]
    assert main([*args, "--out", str(out), "--shadow", "hard"]) == 0
    assert json.loads((out / "take.json").read_text())["dance_name"] == "warmup"
    assert read_truth(out / "truth.npz")["shadow"].any()


@pytest.mark.parametrize(
    "bad",
    [
        ["--size", "0x0"],
        ["--size", "640by480"],
        ["--fps", "-5"],
        ["--fps", "0"],
        ["--seconds", "-1"],
        ["--dance", "moonwalk"],
        ["--attendee", "-3"],
        ["--viewpoint", "42"],
        ["--fps", "fast"],
    ],
)
def test_bad_cli_arguments_give_a_one_line_error_and_exit_2(bad, tmp_path, capsys):
    argv = ["synth", "--out", str(tmp_path / "x"), "--seconds", "0.1", "--size", "64x48", *bad]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_motion_blur_smears_pixels_but_keeps_the_ground_truth():
    dance = Dance.from_name("jump")
    sharp = render(Attendee.from_seed(3), dance.pose(1.2), SMALL)
    blurred = render(Attendee.from_seed(3), dance.pose(1.2), SMALL, blur_from=dance.pose(1.15))
    assert np.array_equal(sharp.keypoints, blurred.keypoints)
    assert np.array_equal(sharp.parts, blurred.parts)
    assert np.abs(sharp.rgb.astype(int) - blurred.rgb.astype(int)).max() > 40


def test_mp4_writer_bumps_repeated_timestamps_and_keeps_bytes(tmp_path):
    from edge_agent.synth.camera import encode_jpeg
    from edge_agent.synth.take import Mjpeg4Writer

    frames = [
        render(Attendee.from_seed(1), BodyPose.neutral(), (64, 48), frame_index=i).rgb
        for i in range(3)
    ]
    jpegs = [encode_jpeg(f, 80) for f in frames]
    writer = Mjpeg4Writer(tmp_path / "t.mp4", (64, 48), 30.0)
    for jpeg, ts in zip(jpegs, (0, 0, 33_000_000), strict=True):  # a repeated timestamp
        writer.write(jpeg, ts)
    writer.close()
    assert read_mp4_jpegs(tmp_path / "t.mp4") == jpegs


def test_any_pose_renders_at_any_size_without_error():
    from edge_agent.synth.body import NUM_ANGLES

    rng = np.random.default_rng(11)
    for k in range(60):
        pose = BodyPose(
            rng.uniform(-3, 3, NUM_ANGLES),
            x=float(rng.uniform(-5, 5)),
            z=float(rng.uniform(-1.9, 3.0)),
            lift=float(rng.uniform(0, 1)),
            yaw=float(rng.uniform(-7, 7)),
            hard_shadow=bool(rng.random() < 0.5),
        )
        size = (int(rng.integers(1, 120)), int(rng.integers(1, 90)))
        f = render(Attendee.from_seed(k), pose, size, viewpoint=k % 5, frame_index=k)
        assert f.rgb.shape == (size[1], size[0], 3) and f.parts.shape == size[::-1]
        xs, ys = f.keypoints[f.visible, 0].astype(int), f.keypoints[f.visible, 1].astype(int)
        assert f.mask[ys, xs].all()


def test_camera_refuses_an_unknown_viewpoint_in_plain_words():
    from edge_agent.errors import BadInput

    with pytest.raises(BadInput, match="viewpoint must be 0..4"):
        SyntheticCamera(SyntheticSource(viewpoint=7, size=(64, 48)), 1.0)


def test_realtime_replay_restores_the_threads_scheduling():
    import os

    fake = _FakeClock()
    cfg = SyntheticSource(attendee=1, dance=1, size=(64, 48), fps=60)
    cam = SyntheticCamera(cfg, 0.05, clock_ns=fake.clock, sleep=fake.sleep)
    before = os.sched_getscheduler(0)
    assert [f.seq for f in cam.frames(realtime=True)] == [0, 1, 2]
    assert os.sched_getscheduler(0) == before


def test_a_take_renders_to_the_same_bytes_twice(tmp_path, monkeypatch):
    import time

    from edge_agent.synth.take import write_take

    now = time.time
    for out, later_s in (("one", 0), ("two", 86_400)):  # the second a day later
        monkeypatch.setattr(time, "time", lambda d=later_s: now() + d)
        write_take(tmp_path / out, attendee=1, dance="1", seconds=0.3, fps=10, size=(64, 48))
    for name in ("frames.mp4", "truth.npz"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_an_interrupted_render_reports_the_interrupt_and_leaves_no_truth_file(
    tmp_path, monkeypatch
):
    import edge_agent.synth.take as take

    real = take.render

    def interrupted(*args, **kw):
        if args[4] == 3:  # frame index
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(take, "render", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        take.write_take(tmp_path / "t", attendee=1, dance="1", seconds=1, fps=10, size=(64, 48))
    assert caught.value.__context__ is None  # not hidden behind a zip error
    assert not (tmp_path / "t" / "truth.npz").exists()
    assert not (tmp_path / "t" / "truth.npz.part").exists()


def test_the_face_parts_mirror_when_the_head_turns_either_way():
    import math

    from edge_agent.synth import BodyPose
    from edge_agent.synth.figure import PART

    att = Attendee.from_seed(6)

    def right_share(yaw_deg: float) -> float:
        pose = BodyPose.neutral().moved(yaw=math.radians(yaw_deg))
        f = render(att, pose, size=(640, 480), noise=False, shadow="none")
        left = int((f.parts == PART["left_face"]).sum())
        right = int((f.parts == PART["right_face"]).sum())
        return right / (left + right)

    for yaw in (20, 50, 70, 80):  # at 60-80 degrees one way the halves used to swap
        assert right_share(yaw) > 0.5 > right_share(-yaw), yaw
        assert right_share(yaw) == pytest.approx(1 - right_share(-yaw), abs=0.1), yaw


def test_eyes_and_nose_are_visible_only_where_the_face_is_drawn():
    from edge_agent.synth import scene
    from edge_agent.synth.body import F, P, forward_kinematics
    from edge_agent.synth.figure import FACE_FEATURES_MIN_FACING

    att, dance = Attendee.from_seed(1), Dance.from_name("turn")
    cam = scene.camera(0, (320, 240))
    seen = 0
    for pose in dance.poses(15, 15):
        body = forward_kinematics(att.proportions, pose)
        to_cam = cam.toward(body.points[P["head"]][None])[0]
        facing = float(body.frames[F["head"]][:, 2] @ to_cam)
        f = render(att, pose, size=(320, 240), noise=False, shadow="none")
        if f.visible[:3].any():
            seen += 1
            assert facing > FACE_FEATURES_MIN_FACING, facing
    assert seen > 50  # the turn faces the camera most of the time
