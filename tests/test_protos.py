"""The gRPC contract round-trips every message the booth sends."""

import numpy as np

from edge_agent import skeleton as sk
from protos import booth_pb2


def test_frame_roundtrip_keeps_jpeg_bytes_untouched():
    jpeg = bytes([0xFF, 0xD8]) + bytes(range(256)) * 40 + bytes([0xFF, 0xD9])
    req = booth_pb2.IngestRequest(
        frame=booth_pb2.Frame(
            session_id="s1",
            camera_id="cam0",
            seq=41,
            capture_ts_ns=1_700_000_000_123_456_789,
            jpeg=jpeg,
        )
    )
    back = booth_pb2.IngestRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("body") == "frame"
    assert back.frame.jpeg == jpeg
    assert back.frame.seq == 41 and back.frame.capture_ts_ns == 1_700_000_000_123_456_789


def test_pose_roundtrip_carries_the_canonical_skeleton():
    skel = np.random.default_rng(0).uniform(0, 640, (23, 3)).astype(np.float32)
    msg = booth_pb2.Pose(
        session_id="s",
        camera_id="c",
        seq=3,
        imputed=True,
        skeleton=booth_pb2.Skeleton(
            keypoints=[booth_pb2.Keypoint(x=x, y=y, score=s) for x, y, s in skel]
        ),
    )
    back = booth_pb2.Pose.FromString(msg.SerializeToString())
    arr = np.array([(k.x, k.y, k.score) for k in back.skeleton.keypoints], np.float32)
    assert arr.shape == (sk.NUM_JOINTS, 3)
    np.testing.assert_array_equal(arr, skel)
    assert back.imputed and not back.glitch


def test_hello_ack_and_commands_roundtrip():
    ack = booth_pb2.IngestResponse(hello_ack=booth_pb2.HelloAck(resume_after_seq=-1))
    assert (
        booth_pb2.IngestResponse.FromString(ack.SerializeToString()).hello_ack.resume_after_seq
        == -1
    )
    cmd = booth_pb2.Command(
        start=booth_pb2.StartTake(command_id="c1", session_id="s", duration_s=15.0)
    )
    back = booth_pb2.Command.FromString(cmd.SerializeToString())
    assert back.WhichOneof("body") == "start" and back.start.duration_s == 15.0
    st = booth_pb2.AgentStatus(
        camera_id="cam0", state=booth_pb2.CAPTURING, capture_dropped=0, fps=119.9
    )
    assert booth_pb2.AgentStatus.FromString(st.SerializeToString()).state == booth_pb2.CAPTURING
