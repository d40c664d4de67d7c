"""Hosted links: one row per link, keyed by the sha256 of its token (never the token)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from cloud_trainer.repository.schema import links


class LinksRepo:
    engine: Any

    @staticmethod
    def _insert_link(
        conn: Connection,
        *,
        token_sha256: str,
        session_id: str,
        created_at: float,
        expires_at: float,
    ) -> None:
        """Insert inside a caller's transaction (delivery writes link, state and email together)."""
        conn.execute(
            links.insert().values(
                token_sha256=token_sha256,
                session_id=session_id,
                created_at=created_at,
                expires_at=expires_at,
                revoked_at=None,
            )
        )

    def insert_link(
        self, *, token_sha256: str, session_id: str, created_at: float, expires_at: float
    ) -> None:
        with self.engine.begin() as conn:
            self._insert_link(
                conn,
                token_sha256=token_sha256,
                session_id=session_id,
                created_at=created_at,
                expires_at=expires_at,
            )

    def get_link(self, token_sha256: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(links).where(links.c.token_sha256 == token_sha256)).first()
        return dict(row._mapping) if row is not None else None

    def list_links(self, session_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(links).where(links.c.session_id == session_id).order_by(links.c.created_at)
            )
            return [dict(r._mapping) for r in rows]

    def revoke_link(self, token_sha256: str, at: float) -> bool:
        """Revoke one link; False if it does not exist. Revoking twice keeps the first time."""
        with self.engine.begin() as conn:
            n = conn.execute(
                update(links)
                .where(links.c.token_sha256 == token_sha256, links.c.revoked_at.is_(None))
                .values(revoked_at=at)
            ).rowcount
            if n:
                return True
            return (
                conn.execute(
                    select(links.c.token_sha256).where(links.c.token_sha256 == token_sha256)
                ).first()
                is not None
            )

    def revoke_session_links(self, session_id: str, at: float) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                update(links)
                .where(links.c.session_id == session_id, links.c.revoked_at.is_(None))
                .values(revoked_at=at)
            ).rowcount
