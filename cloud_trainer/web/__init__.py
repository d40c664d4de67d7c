"""The booth's web app: staff tablet, attendee pages, JSON API, health and metrics.

Build it with ``create_app(settings)``; nothing is started at import.
"""

from cloud_trainer.web.app import create_app

__all__ = ["create_app"]
