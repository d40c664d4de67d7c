"""IngestRepo (takes, frame index, poses, agents) on SQLite and PostgreSQL."""

from __future__ import annotations

import transport_helpers as th

from cloud_trainer.repository import Repository


def _rows(seqs, key="k"):
    return [
        {
            "seq": s,
            "capture_ts_ns": 1_700_000_000_000_000_000 + s,  # needs 64 bits
            "shard_key": key,
            "offset": 8 + s * 10,
            "length": 10,
            "sha256": f"{s:064x}",
        }
        for s in seqs
    ]


def test_a_shard_is_indexed_once_however_often_it_is_committed(db_config):
    repo = Repository.from_config(db_config)
    sid = th.new_session(repo)
    repo.open_take(sid, "cam0", width=640, height=480, fps=120.0)
    assert repo.take_position(sid, "cam0").durable_seq == -1
    pose = {"seq": 2, "keypoints": b"\0" * 276, "imputed": False, "glitch": True}
    for _ in range(2):
        repo.commit_shard(sid, "cam0", _rows(range(5)), [pose], durable_seq=4, pose_durable_seq=2)
    # A rewritten shard (other key) must not move frames that are already indexed.
    repo.commit_shard(
        sid, "cam0", _rows(range(3, 8), key="k2"), [], durable_seq=7, pose_durable_seq=2
    )
    index = repo.frame_index(sid, "cam0")
    assert [r["seq"] for r in index] == list(range(8))
    assert [r["shard_key"] for r in index] == ["k"] * 5 + ["k2"] * 3
    assert index[0]["capture_ts_ns"] == 1_700_000_000_000_000_000
    pos = repo.take_position(sid, "cam0")
    assert (pos.durable_seq, pos.pose_durable_seq, pos.state) == (7, 2, "capturing")
    assert len(repo.pose_rows(sid, "cam0")) == 1
    (take,) = repo.list_takes(sid)
    assert (take["width"], take["durable_seq"]) == (640, 7)


def test_the_resume_position_stops_at_the_first_hole(db_config):
    repo = Repository.from_config(db_config)
    sid = th.new_session(repo)
    repo.open_take(sid, "cam0")
    repo.commit_shard(sid, "cam0", _rows([0, 1, 2, 4, 5]), [], durable_seq=5, pose_durable_seq=-1)
    assert repo.take_position(sid, "cam0").durable_seq == 2
    other = th.new_session(repo)
    repo.open_take(other, "cam0")
    repo.commit_shard(other, "cam0", _rows([1, 2]), [], durable_seq=2, pose_durable_seq=-1)
    assert repo.take_position(other, "cam0").durable_seq == -1  # frame 0 is missing


def test_takes_become_uploaded_once(db_config):
    repo = Repository.from_config(db_config)
    sid = th.new_session(repo, ("cam0", "cam1"))
    for cam in ("cam0", "cam1"):
        repo.open_take(sid, cam)
    repo.end_take(sid, "cam0", 10)
    assert repo.mark_take_uploaded(sid, "cam0") is True
    assert repo.mark_take_uploaded(sid, "cam0") is False
    assert repo.uploaded_cameras(sid) == {"cam0"}
    assert repo.take_position(sid, "cam0").frame_count == 10
    assert repo.session_booth_and_cameras(sid) == (th.BOOTH, "created", ["cam0", "cam1"])
    assert repo.session_booth_and_cameras("nope") is None


def test_agents_keep_their_last_status(db_config):
    repo = Repository.from_config(db_config)
    repo.upsert_agent(
        th.BOOTH, "cam0", state="idle", last_seen=1.0, software_version="1.2", capabilities={"a": 1}
    )
    repo.upsert_agent(th.BOOTH, "cam0", state="capturing", last_seen=2.0, status={"fps": 120.0})
    (agent,) = repo.list_agents(th.BOOTH)
    assert agent["state"] == "capturing" and agent["last_seen"] == 2.0
    assert agent["software_version"] == "1.2" and agent["capabilities"] == {"a": 1}
    assert agent["status"] == {"fps": 120.0}
    assert repo.list_agents("other-booth") == []
