"""Ingest throughput: N simulated cameras stream 640x480 JPEGs to the real ingest server.

For 2 and 4 cameras, on loopback, in the same run:

- ``raw_grpc_mb_s``: the same IngestRequest messages (hello, frames, end), pre-built,
  sent over one gRPC stream per camera to a server that parses and discards them
  (the ceiling gRPC in Python allows on this machine);
- ``ingest_mb_s``: the real path. Per camera an agent ``Streamer`` (frames spooled
  to disk first, read back, sent, acked, spool trimmed) streams to ``booth ingest``
  (shards in a local blob store, index rows in SQLite), until every take is
  confirmed complete;
- ``ratio`` = ingest / raw; ``lost`` and ``duplicated`` from reading every frame
  back through the index and comparing sha256, and from decoding every shard
  (a frame stored in two shards counts as duplicated);
- ``p99_ack_latency_ms``: from a frame leaving the agent to the ack that covers it.

Both servers run as subprocesses and the agents in this process, so each side has
its own interpreter (and GIL), as in production. MB are 10^6 bytes of JPEG payload.
The last stdout line is JSON: the 4-camera numbers at top level and the 2-camera
numbers under ``two_cameras``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from protos import booth_pb2, booth_pb2_grpc  # noqa: E402

BOOTH = "bench-booth"
SIZE = (640, 480)
TARGET_JPEG_BYTES = 50_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- frames -------------------------------------------------------------------------------


def _encode_near(rgb, target: int) -> bytes:
    import cv2

    best = b""
    for q in (95, 90, 85, 80, 75, 70, 60, 50, 40, 30):
        ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        assert ok
        best = buf.tobytes()
        if len(best) <= target * 1.1:
            break
    return best


def base_jpegs(n: int = 8) -> tuple[list[bytes], str]:
    """A few real 640x480 JPEGs of about 50 KB: the synthetic booth, else textured noise."""
    try:
        from edge_agent.synth import Attendee, Dance, render

        attendee, dance = Attendee.from_seed(1), Dance.from_seed(1)
        poses = dance.poses(30.0, n / 30.0)
        frames = [render(attendee, p, size=SIZE, frame_index=i).rgb for i, p in enumerate(poses)]
        source = "synthetic booth"
    except (ImportError, AttributeError, TypeError) as e:
        import numpy as np

        log(f"synthetic booth unavailable ({e}); using noise JPEGs")
        rng = np.random.default_rng(0)
        frames = []
        for _ in range(n):
            coarse = rng.integers(0, 255, (SIZE[1] // 8, SIZE[0] // 8, 3), dtype=np.uint8)
            import cv2

            img = cv2.resize(coarse, SIZE, interpolation=cv2.INTER_CUBIC)
            img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
            frames.append(img)
        source = "noise"
    return [_encode_near(f, TARGET_JPEG_BYTES) for f in frames], source


def frame_bytes(bases: list[bytes], camera: int, seq: int) -> bytes:
    """A base JPEG made unique with a COM segment naming it, so a misplaced frame shows."""
    base = bases[(seq + camera) % len(bases)]
    note = f"cam{camera} seq{seq}".encode()
    return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]


# ---- servers ------------------------------------------------------------------------------


class Discard(booth_pb2_grpc.IngestServicer):
    """Parses every message and keeps nothing: the raw gRPC ceiling."""

    async def Stream(self, request_iterator, context):
        n = 0
        async for req in request_iterator:
            if req.WhichOneof("body") == "frame":
                n += 1
        yield booth_pb2.IngestResponse(ack=booth_pb2.Ack(durable_seq=n - 1, take_complete=True))


async def _serve_discard(port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20),
        ]
    )
    booth_pb2_grpc.add_IngestServicer_to_server(Discard(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def subprocess_server(argv: list[str], log_path: Path):
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            await asyncio.wait_for(ch.channel_ready(), 60)
        except TimeoutError:
            raise SystemExit(
                f"server on {port} did not start:\n{log_path.read_text()[-2000:]}"
            ) from None


# ---- raw gRPC -----------------------------------------------------------------------------


async def run_raw(cameras: int, frames: int, bases: list[bytes], tmp: Path) -> tuple[float, float]:
    port = free_port()
    log_path = tmp / f"discard-{cameras}.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--discard-server", str(port)]
    with subprocess_server(argv, log_path) as proc:
        await wait_ready(port, proc, log_path)
        messages = []
        payload = 0
        for cam in range(cameras):
            ids = {"session_id": "raw", "camera_id": f"cam{cam}"}
            msgs = [booth_pb2.IngestRequest(hello=booth_pb2.Hello(booth_id=BOOTH, **ids))]
            for seq in range(frames):
                jpeg = frame_bytes(bases, cam, seq)
                payload += len(jpeg)
                msgs.append(
                    booth_pb2.IngestRequest(
                        frame=booth_pb2.Frame(seq=seq, capture_ts_ns=seq, jpeg=jpeg, **ids)
                    )
                )
            msgs.append(booth_pb2.IngestRequest(end=booth_pb2.EndOfTake(frame_count=frames, **ids)))
            messages.append(msgs)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 16 << 20)]
        )
        await channel.channel_ready()
        stub = booth_pb2_grpc.IngestStub(channel)

        async def one(msgs) -> None:
            call = stub.Stream()
            for m in msgs:
                await call.write(m)
            await call.done_writing()
            resp = await call.read()
            assert resp.ack.durable_seq == frames - 1, resp

        client0, server0 = time.process_time(), proc_cpu_s(proc.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(m) for m in messages))
        elapsed = time.perf_counter() - t0
        client_cpu = time.process_time() - client0
        server_cpu = proc_cpu_s(proc.pid) - server0
        cpu = client_cpu + server_cpu
        log(
            f"  cpu ms/MB: client {client_cpu * 1e9 / payload:.2f}, "
            f"server {server_cpu * 1e9 / payload:.2f}"
        )
        await channel.close()
    return payload / elapsed / 1e6, cpu * 1000 / (payload / 1e6)


# ---- the real path ------------------------------------------------------------------------


def token_for(cam: str) -> str:
    return f"bench-token-{cam}-0123456789abcdef"


async def run_ingest(
    cameras: int, frames: int, bases: list[bytes], tmp: Path, round_no: int = 0
) -> dict:
    from cloud_trainer.config import BoothConfig
    from cloud_trainer.ingest.shards import decode_shard, read_frame
    from cloud_trainer.repository import Repository
    from cloud_trainer.storage import create_blob_store
    from edge_agent.config import UplinkConfig
    from edge_agent.frames import CapturedFrame
    from edge_agent.stream import Streamer

    work = tmp / f"ingest-{cameras}-{round_no}"
    work.mkdir()
    port = free_port()
    cams = [f"cam{i}" for i in range(cameras)]
    cfg = BoothConfig.model_validate(
        {
            "booth": {"id": BOOTH},
            "agent": {"booth_id": BOOTH},
            "ingest": {
                "host": "127.0.0.1",
                "port": port,
                "agents": [
                    {
                        "camera_id": c,
                        "token_sha256": hashlib.sha256(token_for(c).encode()).hexdigest(),
                    }
                    for c in cams
                ],
            },
            "storage": {"type": "local", "root": str(work / "blobs")},
            "database": {"type": "sqlite", "path": str(work / "booth.db")},
        }
    )
    config = work / "booth.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    repo = Repository.from_config(cfg.database)
    store = create_blob_store(cfg.storage)
    sid = repo.create_session(
        booth_id=BOOTH,
        name="bench",
        email="bench@example.com",
        consent=True,
        reference_name="ref",
        take_s=frames / 120,
        cameras=cams,
    )
    takes = {
        cam: [
            CapturedFrame(seq, 1_000_000 + seq * 8_333_333, frame_bytes(bases, i, seq))
            for seq in range(frames)
        ]
        for i, cam in enumerate(cams)
    }
    payload = sum(len(f.jpeg) for fs in takes.values() for f in fs)
    log_path = work / "ingest.log"
    argv = [sys.executable, "-m", "cloud_trainer.cli", "ingest", "--config", str(config)]
    with subprocess_server(argv, log_path) as proc:
        await wait_ready(port, proc, log_path)
        streamers = []
        for cam in cams:
            uplink = UplinkConfig(
                address=f"127.0.0.1:{port}",
                token=token_for(cam),
                spool_dir=work / f"spool-{cam}",
                spool_budget_mb=4096,
            )
            st = Streamer(uplink, booth_id=BOOTH, camera_id=cam)
            await st.start()
            streamers.append(st)

        def capture(st: Streamer) -> None:
            take = st.open_take(sid, width=SIZE[0], height=SIZE[1], fps=120.0)
            take.add_frames(takes[st.camera_id])
            take.end()

        agent0, server0 = time.process_time(), proc_cpu_s(proc.pid)
        t0 = time.perf_counter()
        feeders = [threading.Thread(target=capture, args=(st,)) for st in streamers]
        for t in feeders:
            t.start()
        try:
            await asyncio.gather(*(st.wait_uploaded(sid, timeout_s=600) for st in streamers))
        except TimeoutError:
            raise SystemExit(f"upload did not finish:\n{log_path.read_text()[-3000:]}") from None
        elapsed = time.perf_counter() - t0
        for t in feeders:
            t.join()
        agent_cpu = time.process_time() - agent0
        server_cpu = proc_cpu_s(proc.pid) - server0
        cpu = agent_cpu + server_cpu
        log(
            f"  cpu ms/MB: agents {agent_cpu * 1e9 / payload:.2f}, "
            f"server {server_cpu * 1e9 / payload:.2f}"
        )
        latencies = sorted(x for st in streamers for x in st.ack_latencies_s)
        for st in streamers:
            await st.stop()

    log(f"  {cameras} cameras: uploaded in {elapsed:.2f} s; verifying every frame")
    lost = duplicated = 0
    for cam in cams:
        rows = {r["seq"]: r for r in repo.frame_index(sid, cam)}
        for f in takes[cam]:
            row = rows.get(f.seq)
            if row is None or read_frame(store, row, verify=False) != f.jpeg:
                lost += 1
        seen: dict[int, int] = {}
        for key in store.list(f"sessions/{sid}/frames/{cam}/"):
            for f in decode_shard(store.get(key)):
                seen[f.seq] = seen.get(f.seq, 0) + 1
        duplicated += sum(n - 1 for n in seen.values() if n > 1)
    assert repo.get_session(sid)["state"] == "uploaded"
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
    return {
        "ingest_mb_s": payload / elapsed / 1e6,
        "lost": lost,
        "duplicated": duplicated,
        "p99_ack_latency_ms": p99 * 1000,
        "payload_mb": payload / 1e6,
        "seconds": elapsed,
        "cpu_ms_per_mb": cpu * 1000 / (payload / 1e6),
    }


async def bench(frames: int, camera_counts: list[int], rounds: int) -> dict:
    bases, source = base_jpegs()
    mean_kb = sum(len(b) for b in bases) / len(bases) / 1000
    log(f"frames: {source}, {SIZE[0]}x{SIZE[1]}, mean {mean_kb:.0f} KB; {frames} per camera")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for cameras in camera_counts:
            raws, ings = [], []
            # Interleaved rounds, best of each: the machine is shared, and contention only
            # ever slows a run down, so the best round is the least disturbed one.
            for r in range(rounds):
                log(f"{cameras} cameras, round {r + 1}/{rounds}: raw gRPC to a discarding server")
                raws.append(await run_raw(cameras, frames, bases, Path(tmp)))
                log(f"  raw {raws[-1][0]:.1f} MB/s; now the real ingest path")
                ings.append(await run_ingest(cameras, frames, bases, Path(tmp), r))
                log(f"  ingest {ings[-1]['ingest_mb_s']:.1f} MB/s")
            raw_mb_s, raw_cpu = max(raws)[0], min(c for _, c in raws)
            best = max(ings, key=lambda i: i["ingest_mb_s"])
            ing_cpu = min(i["cpu_ms_per_mb"] for i in ings)
            results[cameras] = {
                "cameras": cameras,
                "frames": frames * cameras,
                "raw_grpc_mb_s": round(raw_mb_s, 1),
                "ingest_mb_s": round(best["ingest_mb_s"], 1),
                "ratio": round(best["ingest_mb_s"] / raw_mb_s, 3),
                "lost": sum(i["lost"] for i in ings),  # over every round
                "duplicated": sum(i["duplicated"] for i in ings),
                "p99_ack_latency_ms": round(best["p99_ack_latency_ms"], 1),
                # CPU per MB (both processes) is steadier than wall time on a busy machine.
                "raw_cpu_ms_per_mb": round(raw_cpu, 2),
                "ingest_cpu_ms_per_mb": round(ing_cpu, 2),
                "cpu_ratio": round(raw_cpu / ing_cpu, 3),
                "rounds": rounds,
                "mean_jpeg_kb": round(mean_kb, 1),
                "frame_source": source,
            }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=600, help="frames per camera")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    p.add_argument("--discard-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.discard_server:
        asyncio.run(_serve_discard(args.discard_server))
        return
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    results = asyncio.run(bench(args.frames, [2, 4], args.rounds))
    four = results[4]
    out = {**four, "two_cameras": results[2]}
    out["goal_24_mb_s_for_4_cameras"] = four["ingest_mb_s"] >= 24.0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
