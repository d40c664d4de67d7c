"""Pose backends behind one interface. See ``base.create_pose_backend``."""
