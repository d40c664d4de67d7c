"""Retention: each booth's sweep deletes its own sessions whose time is up, no one else's.

Several booths may share one database (one per conference hall) while each keeps its
blobs in its own store: a sweep deleting another booth's rows would leave that booth's
videos behind with nothing pointing at them.
"""

from __future__ import annotations

import time

import transport_helpers as th
from sqlalchemy import update
from staff_app import delivered_session

from cloud_trainer.front_desk import FrontDesk
from cloud_trainer.repository import Repository
from cloud_trainer.repository.schema import links, sessions
from cloud_trainer.storage.local import LocalBlobStore

KEEP_S = 30 * 86400


def _expire_links(repo: Repository, sid: str, now: float) -> None:
    with repo.engine.begin() as conn:
        conn.execute(update(links).where(links.c.session_id == sid).values(expires_at=now - 1))


def test_a_booths_sweep_leaves_other_booths_sessions_alone(db_config, tmp_path):
    repo = Repository.from_config(db_config)
    store = LocalBlobStore(tmp_path / "blobs")
    try:
        now = time.time()
        ours, _ = delivered_session(repo, store)  # booth-1
        theirs, _ = delivered_session(repo, store)
        old_theirs = th.new_session(repo, booth_id="booth-2")
        with repo.engine.begin() as conn:
            conn.execute(update(sessions).where(sessions.c.id == theirs).values(booth_id="booth-2"))
            conn.execute(
                update(sessions)
                .where(sessions.c.id == old_theirs)
                .values(created_at=now - KEEP_S - 60)
            )
        for sid in (ours, theirs):
            _expire_links(repo, sid, now)
        desk = FrontDesk(
            repo,
            booth_id="booth-1",
            take_s=1.0,
            cameras=lambda: ["cam0"],
            delete_blobs=lambda sid: store.delete_prefix(f"sessions/{sid}/"),
        )
        assert desk.expired(KEEP_S, now) == [ours]
        assert desk.delete_expired(KEEP_S, now) == 1
        assert repo.session_deleted(ours)
        assert repo.get_session(theirs)["booth_id"] == "booth-2"
        assert list(store.list(f"sessions/{theirs}/"))
        assert repo.get_session(old_theirs)
    finally:
        repo.close()


def test_one_session_that_cannot_be_deleted_does_not_keep_the_others(db_config, tmp_path):
    repo = Repository.from_config(db_config)
    store = LocalBlobStore(tmp_path / "blobs")
    try:
        now = time.time()
        sids = [delivered_session(repo, store)[0] for _ in range(3)]
        for sid in sids:
            _expire_links(repo, sid, now)
        stuck = sorted(sids)[0]  # the first the sweep meets

        def delete_blobs(sid: str) -> None:
            if sid == stuck:
                raise OSError("the blob store refused the delete")
            store.delete_prefix(f"sessions/{sid}/")

        desk = FrontDesk(
            repo,
            booth_id="booth-1",
            take_s=1.0,
            cameras=lambda: ["cam0"],
            delete_blobs=delete_blobs,
        )
        assert desk.delete_expired(KEEP_S, now) == 2
        assert [repo.session_deleted(s) for s in sorted(sids)] == [False, True, True]
        assert desk.expired(KEEP_S, now) == [stuck]  # tried again next round
    finally:
        repo.close()


def test_a_session_stays_while_any_of_its_links_works(db_config, tmp_path):
    """A resend makes a new link: the first one running out must not delete the video the
    attendee was just sent again."""
    from cloud_trainer import links as links_mod

    repo = Repository.from_config(db_config)
    store = LocalBlobStore(tmp_path / "blobs")
    try:
        now = time.time()
        sid, _ = delivered_session(repo, store)
        _expire_links(repo, sid, now)  # the first email's link ran out...
        resent = links_mod.create_link(repo, sid, expiry_days=30, now=now)  # ...a resend's has not
        desk = FrontDesk(
            repo,
            booth_id="booth-1",
            take_s=1.0,
            cameras=lambda: [],
            delete_blobs=lambda s: store.delete_prefix(f"sessions/{s}/"),
        )
        assert desk.expired(KEEP_S, now) == []
        assert desk.delete_expired(KEEP_S, now) == 0
        assert links_mod.resolve(repo, resent.token, now=now)["id"] == sid
        assert list(store.list(f"sessions/{sid}/"))
        assert desk.expired(KEEP_S, resent.expires_at + 1) == [sid]  # then it goes
    finally:
        repo.close()
