"""The synthetic booth: a rendered dancer with ground truth, usable as a camera.

It is the measuring instrument of the project (pose error, smoothing error and
motion-transfer quality are all measured against its ground truth), so every
output is deterministic: equal seeds give equal bytes.

Public API
----------
``Attendee.from_seed(n)``
    Proportions (height, build, limb ratios; in head heights) and appearance
    (skin, hair style and colour, clothing colours and pattern, shoes). Also
    decides whether the booth's side spotlight casts a hard wall shadow.
``Dance.from_seed(m)`` / ``Dance.from_name("warmup")`` / ``Dance.parse("wave+squat")``
    A choreography. ``dance.pose(t)`` gives the ``BodyPose`` at ``t`` seconds and
    ``dance.poses(fps, seconds)`` a list of them. Moves (``MOVES``): groove, wave,
    squat, step, turn, jump, disco, march, warmup (full range of motion) and
    stepout (leaves the frame sideways while the wall shadow stays; by name only).
``BodyPose``
    Joint angles (``ANGLE_NAMES``, radians) plus floor position ``x``/``z``,
    ``lift`` and ``yaw``: no pixels. The pelvis height follows from whoever is
    rendered, so attendee A can be rendered in attendee B's poses with A's own
    bones (the ground truth of motion transfer). ``as_vector``/``from_vector``
    store poses as flat arrays.
``render(attendee, pose, size=(w, h), viewpoint=0, frame_index=0, shadow="auto", noise=True)``
    Returns a ``SynthFrame``:

    - ``rgb`` (H, W, 3) uint8 RGB;
    - ``keypoints`` (23, 3) float32 in ``edge_agent.skeleton`` order, score 1
      where visible, 0 (and x = y = 0) where occluded or out of frame;
    - ``projected`` (23, 2) float32: every joint's un-occluded position;
    - ``visible``, ``in_frame`` (23,) bool (``occluded`` = in frame, not visible);
    - ``mask`` (H, W) bool person mask; ``parts`` (H, W) uint8 part map;
    - ``shadow_mask`` (H, W) bool of the visible hard wall shadow, or None.

    ``shadow``: ``auto`` (soft floor shadow; hard wall shadow when the attendee
    or the dance asks for the spotlight), ``hard``, ``soft`` or ``none``.
    Viewpoints (``scene.VIEWPOINTS``): 0 centre, 1 and 2 a camera pair 0.7 m to
    the right and left aimed at the dance zone, 3 and 4 further out.

Part map (``PART_NAMES``; BodyPix's 24 parts shifted by one, 0 = background)::

     1 left_face               2 right_face
     3 left_upper_arm_front    4 left_upper_arm_back
     5 right_upper_arm_front   6 right_upper_arm_back
     7 left_lower_arm_front    8 left_lower_arm_back
     9 right_lower_arm_front  10 right_lower_arm_back
    11 left_hand              12 right_hand
    13 torso_front            14 torso_back
    15 left_upper_leg_front   16 left_upper_leg_back
    17 right_upper_leg_front  18 right_upper_leg_back
    19 left_lower_leg_front   20 left_lower_leg_back
    21 right_lower_leg_front  22 right_lower_leg_back
    23 left_foot              24 right_foot

Left and right are the person's. "front"/"back" says whether the limb's front
(anterior) surface faces the camera. Hair counts as face, the neck as torso.

``SyntheticCamera(cfg: SyntheticSource, seconds, clock_ns=time.monotonic_ns)``
    ``prerender()`` renders and JPEG-encodes the take; ``frames()`` yields
    ``CapturedFrame(seq, capture_ts_ns, jpeg)`` at exactly ``cfg.fps``;
    ``granted()``; ``ground_truth(seq)`` re-renders frame ``seq``'s ``SynthFrame``.
``write_take(out_dir, ...)`` / ``read_truth(path)`` / ``read_mp4_jpegs(path)``
    The on-disk take written by ``booth synth`` (see ``edge_agent.synth.take``).
"""

from edge_agent.synth.appearance import Appearance, Attendee
from edge_agent.synth.body import ANGLE_NAMES, BodyPose, Proportions, forward_kinematics
from edge_agent.synth.camera import SyntheticCamera
from edge_agent.synth.choreography import MOVES, Dance, mirror
from edge_agent.synth.figure import NUM_PARTS, PART, PART_NAMES
from edge_agent.synth.render import SynthFrame, render
from edge_agent.synth.take import read_mp4_jpegs, read_truth, write_take

__all__ = [
    "ANGLE_NAMES",
    "MOVES",
    "NUM_PARTS",
    "PART",
    "PART_NAMES",
    "Appearance",
    "Attendee",
    "BodyPose",
    "Dance",
    "Proportions",
    "SynthFrame",
    "SyntheticCamera",
    "forward_kinematics",
    "mirror",
    "read_mp4_jpegs",
    "read_truth",
    "render",
    "write_take",
]
