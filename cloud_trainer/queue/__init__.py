"""Job queues: ``sqlite`` (embedded default, leases in a table) and ``pubsub`` (Cloud Pub/Sub)."""

from cloud_trainer.queue.base import JobQueue, Lease, create_job_queue

__all__ = ["JobQueue", "Lease", "create_job_queue"]
