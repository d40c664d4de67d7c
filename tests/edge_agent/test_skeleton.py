import numpy as np
import pytest

from edge_agent import skeleton as sk


def test_canonical_skeleton_is_coco17_plus_six_feet():
    assert sk.NUM_JOINTS == 23
    assert sk.JOINTS[:3] == ("nose", "left_eye", "right_eye")
    assert sk.JOINTS[16] == "right_ankle" and sk.JOINTS[17:] == (
        "left_big_toe",
        "left_small_toe",
        "left_heel",
        "right_big_toe",
        "right_small_toe",
        "right_heel",
    )


def test_every_left_joint_has_a_right_twin():
    assert len(sk.FLIP_PAIRS) == 11
    for a, b in sk.FLIP_PAIRS:
        assert sk.JOINTS[a].replace("left_", "right_") == sk.JOINTS[b]


def test_blazepose_mapping_keeps_pixels_and_scores():
    lm = np.zeros((33, 4), np.float32)
    lm[:, 0] = np.arange(33)
    lm[:, 1] = np.arange(33) * 2
    lm[:, 2] = 0.9
    out = sk.from_blazepose(lm)
    assert out.shape == (23, 3)
    assert out[sk.INDEX["left_heel"]].tolist() == pytest.approx([29, 58, 0.9])
    assert out[sk.INDEX["right_big_toe"]].tolist() == pytest.approx([32, 64, 0.9])
    assert (out[:, 2] > 0).all()


def test_movenet_mapping_converts_normalised_yx_to_pixels():
    kp = np.zeros((1, 1, 17, 3), np.float32)
    kp[0, 0, 0] = (0.5, 0.25, 0.8)  # y, x, score
    out = sk.from_movenet(kp, width=640, height=480)
    assert out[0].tolist() == pytest.approx([160, 240, 0.8])
    assert (out[17:, 2] == 0).all()  # MoveNet has no feet


def test_validate_rejects_wrong_shape_and_nan_scores():
    with pytest.raises(ValueError):
        sk.validate(np.zeros((17, 3)))
    bad = sk.empty()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError):
        sk.validate(bad)


def test_limbs_have_one_colour_each():
    assert len(sk.LIMB_INDEX) == len(sk.LIMB_COLORS)
