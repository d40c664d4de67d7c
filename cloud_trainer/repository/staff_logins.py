"""Staff logins: one row per login, keyed by the sha256 of its id (never the id itself).

The web app reads a login by its key on every staff request (one primary-key
lookup), so ending a login here ends it at once, whatever copies of its cookie exist.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update

from cloud_trainer.repository.schema import staff_logins


class StaffLoginsRepo:
    engine: Any

    def insert_staff_login(
        self,
        *,
        id_sha256: str,
        booth_id: str,
        username: str,
        password_hash_sha256: str,
        created_at: float,
        forget_before: float,
    ) -> None:
        """Record a login, and forget this booth's logins made before ``forget_before``.

        Those are older than any cookie that could name them, so nothing reads them again;
        forgetting them at each login keeps the table as small as a day's logins.
        """
        with self.engine.begin() as conn:
            conn.execute(
                delete(staff_logins).where(
                    staff_logins.c.booth_id == booth_id,
                    staff_logins.c.created_at < forget_before,
                )
            )
            conn.execute(
                staff_logins.insert().values(
                    id_sha256=id_sha256,
                    booth_id=booth_id,
                    username=username,
                    password_hash_sha256=password_hash_sha256,
                    created_at=created_at,
                    revoked_at=None,
                )
            )

    def get_staff_login(self, id_sha256: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(staff_logins).where(staff_logins.c.id_sha256 == id_sha256)
            ).first()
        return dict(row._mapping) if row is not None else None

    def revoke_staff_login(self, id_sha256: str, at: float) -> bool:
        """End one login; False if it was already ended or never existed."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(staff_logins)
                    .where(
                        staff_logins.c.id_sha256 == id_sha256, staff_logins.c.revoked_at.is_(None)
                    )
                    .values(revoked_at=at)
                ).rowcount
            )

    def revoke_staff_logins(self, booth_id: str, username: str, at: float) -> int:
        """End every open login of ``username`` at ``booth_id``; returns how many there were."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(staff_logins)
                .where(
                    staff_logins.c.booth_id == booth_id,
                    staff_logins.c.username == username,
                    staff_logins.c.revoked_at.is_(None),
                )
                .values(revoked_at=at)
            ).rowcount
