"""dancebooth edge agent: capture, pose, smoothing and streaming on a booth board.

Nothing here imports cloud_trainer, and nothing touches a device at import time.
"""

__version__ = "0.1.0"
