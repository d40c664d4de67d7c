"""Capture: camera sources, the take's hot path, MP4 segments and asynchronous pose.

Data flows one way::

    CameraSource.frames()            (compressed JPEG frames, stamped on the BoothClock)
        │  Take._capture: the hot path, never decodes, never waits
        ├──> SegmentRecorder.queue   bounded; writer thread muxes MJPEG-in-MP4 segments,
        │                            a finalizer thread closes, fsyncs and renames them
        ├──> stream subscriptions    bounded, one per subscriber (the uplink)
        └──> LatestSlot              latest wins; PoseWorker decodes and poses
    after the take: catch_up() over the finished segments, smooth_offline(),
    then poses.npz, frames.csv and take.json next to the segments.

Modules: ``sources`` (V4L2, video file, synthetic, in-memory replay), ``segments``
(segment writer and reader), ``take`` (the take), ``pose_worker`` (live worker and
catch-up), ``buffers`` (the non-blocking hand-offs), ``clock`` (the booth clock).

The seam for the uplink (transport stage)
-----------------------------------------
- ``Take.subscribe_stream(maxlen=None) -> BoundedBuffer[CapturedFrame]``. Subscribe
  before ``Take.start()`` to receive every frame (``Agent.add_take_listener`` calls
  you at that moment). ``buf.get(timeout)`` returns the next frame, ``None`` once
  the take has ended and the buffer is drained, and raises ``queue.Empty`` on
  timeout; iterating the buffer does the same without a timeout. The capture loop
  never waits for you: when the buffer is full the newest frame is dropped and
  counted in ``buf.dropped``. A gap in ``seq`` therefore means "fetch these from
  disk": ``segments.read_segment_frames(info)`` yields ``(seq, jpeg)`` for a
  finished segment (``Take.recorder.finished_segments()``, or the ``segments``
  list in ``take.json``), byte-identical to what the camera sent.
- ``Take.add_done_callback(fn)``: ``fn(summary)`` once segments, ``poses.npz``
  (seq, capture_ts_ns, raw, skeleton, detected, imputed, glitch, source) and
  ``take.json`` are on disk.
"""

from edge_agent.capture.buffers import BoundedBuffer, LatestSlot
from edge_agent.capture.clock import BoothClock
from edge_agent.capture.segments import SegmentInfo, read_segment_frames
from edge_agent.capture.sources import CameraSource, create_source
from edge_agent.capture.take import Take, TakeSummary

__all__ = [
    "BoothClock",
    "BoundedBuffer",
    "CameraSource",
    "LatestSlot",
    "SegmentInfo",
    "Take",
    "TakeSummary",
    "create_source",
    "read_segment_frames",
]
