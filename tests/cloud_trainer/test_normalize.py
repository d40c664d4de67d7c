"""EDN-style global normalization on synthetic takes with ground-truth keypoints."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_trainer import labelmap, normalize
from edge_agent import skeleton as sk
from edge_agent.synth.appearance import Attendee
from edge_agent.synth.choreography import Dance
from edge_agent.synth.render import render

SIZE = (320, 240)
FPS, SECONDS = 8.0, 3.0
SHORT, TALL, DANCER = 7, 15, 2  # attendee seeds: 1.54 m, 1.87 m; the reference dancer 1.81 m


def _take(seed: int, dance: str, x: float = 0.0, z: float = 0.0) -> np.ndarray:
    """Ground-truth keypoints of attendee ``seed`` dancing, standing at (x, z) in the booth."""
    attendee = Attendee.from_seed(seed)
    out = []
    for i, pose in enumerate(Dance.parse(dance).poses(FPS, SECONDS)):
        pose = pose.moved(x=pose.x + x, z=pose.z + z)
        f = render(attendee, pose, SIZE, 0, i, shadow="none", noise=False)
        out.append(f.keypoints)
    return np.stack(out)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _take(DANCER, "wave+squat+step")


def _floor_line(take: np.ndarray) -> float:
    return float(np.median(normalize.floor_contact(take, 0.5)))


def _lowest_row(label: np.ndarray) -> int:
    rows = np.flatnonzero(label.any(axis=(1, 2)))
    return int(rows.max())


@pytest.mark.parametrize(("seed", "x", "z"), [(SHORT, 0.35, 0.6), (TALL, -0.3, -0.8)])
def test_rendered_feet_stay_on_the_attendees_floor_line(reference, seed, x, z):
    take = _take(seed, "march", x=x, z=z)  # nearer to / farther from the camera
    out = normalize.normalize(reference, take)
    floor = _floor_line(take)
    assert abs(_floor_line(reference) - floor) > 10  # so the test could fail

    # Frames where the reference dancer stands on the floor (a foot down) land on it.
    ref_floor = normalize.floor_contact(reference, 0.5)
    grounded = np.abs(ref_floor - np.median(ref_floor)) < 2.0
    assert grounded.sum() >= len(reference) // 2
    feet = normalize.floor_contact(out, 0.5)[grounded]
    assert np.abs(feet - floor).max() <= 3.0, (feet, floor)

    # In the attendee's training crop, the rendered label map's feet are where theirs are.
    framing = labelmap.Framing.from_poses(take, *SIZE)
    size = 128
    own = [_lowest_row(labelmap.render_skeleton(framing.to_crop(s, size), size)) for s in take]
    ours = [
        _lowest_row(labelmap.render_skeleton(framing.to_crop(s, size), size)) for s in out[grounded]
    ]
    assert abs(np.median(ours) - np.median(own)) <= 2, (np.median(ours), np.median(own))

    # The reference is scaled to the attendee's height and moved to where they stood.
    h_att = np.percentile(normalize.body_heights(take, 0.5), 90)
    h_out = np.percentile(normalize.body_heights(out, 0.5), 90)
    assert h_out == pytest.approx(h_att, rel=0.04)
    # Where they stood: the feet's horizontal centre (hips sway with the dance).
    ankles = [sk.INDEX["left_ankle"], sk.INDEX["right_ankle"]]
    centre = lambda p: float(np.median(p[:, ankles, 0]))  # noqa: E731
    assert abs(centre(reference) - centre(take)) > 20  # so the test could fail
    assert centre(out) == pytest.approx(centre(take), abs=0.05 * float(h_att))


def test_short_and_tall_attendees_get_different_scales(reference):
    short = normalize.normalize(reference, _take(SHORT, "march"))
    tall = normalize.normalize(reference, _take(TALL, "march"))
    ratio = np.percentile(normalize.body_heights(tall, 0.5), 90) / np.percentile(
        normalize.body_heights(short, 0.5), 90
    )
    assert ratio == pytest.approx(1.865 / 1.539, rel=0.05)


def test_depth_is_interpolated_between_far_and_close_positions():
    """A subject walking towards the camera: each depth maps to the matching target depth."""
    ref = np.zeros((40, sk.NUM_JOINTS, 3), dtype=np.float32)
    ref[:, :, 2] = 1.0
    floor = np.linspace(300, 400, 40)  # walking from far (300) to close (400)
    height = floor * 0.5  # farther = smaller
    ref[:, :, 1] = floor[:, None] - height[:, None] * 0.5
    ref[:, sk.INDEX["nose"], 1] = floor - height
    ref[:, sk.INDEX["left_ankle"], 1] = floor
    ref[:, sk.INDEX["right_ankle"], 1] = floor - 5
    ref[:, :, 0] = 320
    take = ref.copy()
    take[:, :, 1] = ref[:, :, 1] * 0.5 + 100  # a smaller booth image: floor 250..300
    take[:, :, 0] = 100
    out = normalize.normalize(ref, take)
    np.testing.assert_allclose(normalize.floor_contact(out), normalize.floor_contact(take), atol=1)
    np.testing.assert_allclose(normalize.body_heights(out), normalize.body_heights(take), rtol=0.06)
    assert np.allclose(out[:, sk.INDEX["nose"], 0], 100, atol=1)


def test_a_take_without_ankles_cannot_be_normalized():
    from edge_agent.errors import BadInput

    ref = np.ones((5, sk.NUM_JOINTS, 3), dtype=np.float32)
    ref[:, sk.INDEX["left_ankle"], 1] = ref[:, sk.INDEX["right_ankle"], 1] = 100
    take = ref.copy()
    take[:, sk.INDEX["left_ankle"], 2] = 0
    take[:, sk.INDEX["right_ankle"], 2] = 0
    with pytest.raises(BadInput, match="attendee's take"):
        normalize.fit(ref, take)
    with pytest.raises(BadInput, match="the reference"):
        normalize.fit(take, ref)


def _standing(n: int = 40, floor: float = 400.0, height: float = 200.0) -> np.ndarray:
    """A subject standing at ``floor`` (image y), ``height`` px tall, nose at the top."""
    p = np.zeros((n, sk.NUM_JOINTS, 3), dtype=np.float32)
    p[:, :, 2] = 1.0
    p[:, :, 0] = 320
    p[:, :, 1] = floor - height * 0.5
    p[:, sk.INDEX["nose"], 1] = floor - height
    p[:, sk.INDEX["left_ankle"], 1] = floor
    p[:, sk.INDEX["right_ankle"], 1] = floor - 3
    return p


def _jumping(n: int = 40, floor: float = 400.0, height: float = 200.0) -> np.ndarray:
    """The same subject jumping four times (three frames in the air each)."""
    p = _standing(n, floor, height)
    lift = np.zeros(n, np.float32)
    for start in (5, 15, 25, 35):
        lift[start : start + 3] = (20, 40, 20)
    p[:, :, 1] -= lift[:, None]
    return p


def test_a_jump_is_rendered_as_a_jump_and_the_attendees_own_jumps_keep_their_floor():
    take = _standing(floor=300.0, height=100.0)  # the attendee: half the size, floor 300
    out = normalize.normalize(_jumping(), take)
    np.testing.assert_allclose(300 - normalize.floor_contact(out)[4:9], [0, 10, 20, 10, 0])
    # An attendee who jumped in their take still stands on their floor line.
    grounded = normalize.normalize(_standing(), _jumping(floor=300.0, height=100.0))
    np.testing.assert_allclose(normalize.floor_contact(grounded), 300.0)


def test_ankles_the_model_barely_saw_do_not_move_the_body():
    # A reference dancer walking toward the camera (floor 300 -> 400), so the depth model
    # is on and a wrong floor would also rescale the body.
    ref = _standing()
    floor = np.linspace(300, 400, len(ref))
    height = floor * 0.5
    ref[:, :, 1] = (floor - height * 0.5)[:, None]
    ref[:, sk.INDEX["nose"], 1] = floor - height
    ref[:, sk.INDEX["left_ankle"], 1] = floor
    ref[:, sk.INDEX["right_ankle"], 1] = floor - 3
    take = _standing(floor=300.0, height=100.0)
    guessed = ref.copy()
    ankles = [sk.INDEX["left_ankle"], sk.INDEX["right_ankle"]]
    guessed[20:24, ankles, 2] = 0.1  # hidden feet: the model's low-score guess,
    guessed[20:24, ankles, 1] -= 30  # 30 px off
    nose = sk.INDEX["nose"]
    clean = normalize.normalize(ref, take)[:, nose, 1]
    assert np.abs(normalize.normalize(guessed, take)[:, nose, 1] - clean).max() < 1.0


def test_a_squatting_reference_is_not_drawn_taller_than_the_attendee():
    """Squats lift the ankles a little: they used to switch the depth model on and scale
    the squat frames by up to 1.28."""
    fps, seconds = 8.0, 12.0

    def dance(seed: int, moves: str) -> np.ndarray:
        attendee = Attendee.from_seed(seed)
        poses = Dance.parse(moves).poses(fps, seconds)
        return np.stack(
            [
                render(attendee, p, SIZE, 0, i, shadow="none", noise=False).keypoints
                for i, p in enumerate(poses)
            ]
        )

    reference = dance(DANCER, "wave+squat")
    truth = dance(TALL, "wave+squat")  # the attendee really doing it
    out = normalize.normalize(reference, dance(TALL, "march"), reference_fps=fps, take_fps=fps)
    ratio = normalize.body_heights(out, 0.5) / normalize.body_heights(truth, 0.5)
    ratio = ratio[np.isfinite(ratio)]
    assert len(ratio) > 0.8 * len(reference)
    assert ratio.max() < 1.08, ratio.max()
