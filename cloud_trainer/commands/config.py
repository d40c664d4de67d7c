"""``booth config example|validate``."""

from __future__ import annotations

import argparse
import sys

# Sections only the cloud's services read: a file with any is checked as theirs too.
CLOUD_SECTIONS = frozenset(
    {"booth", "web", "ingest", "mail", "database", "storage", "queue", "trainer", "render", "links"}
)

EXAMPLE = """\
# dancebooth config. Every key is optional; these are the embedded defaults,
# which run a whole booth on one machine (SQLite, local blobs, maildir). A section
# you do write that picks a backend (source, pose, storage, database, queue, mail)
# needs its `type:` line.
booth:
  id: booth-1
  name: dancebooth
  take_s: 15            # seconds each take captures
  countdown_s: 3
  upload_deadline_s: 1800  # a take not uploaded by then fails, naming the missing cameras
  timezone: UTC         # where the booth stands (IANA name): "today" and email times

models_dir: models      # filled by `make models` from the mediapipe wheel

agent:                  # one edge agent (a board may carry only this section)
  booth_id: booth-1
  camera_id: cam0
  source:               # synthetic | v4l2 | file
    type: synthetic
    attendee: 1
    dance: 1
    size: 640x480
    fps: 120
  pose:                 # cpu | edgetpu
    type: cpu
    models_dir: models
    threads: 2
    mode: tracking      # tracking | full
  capture:
    out_dir: var/takes
    segment_s: 2
    stall_restart_s: 20  # a camera silent this long mid-take: exit 3 to be restarted
  uplink:
    address: 127.0.0.1:50051
    token: changethis   # the agent refuses to start until this is set
    spool_dir: var/spool
    spool_budget_mb: 2048

ingest:
  host: 127.0.0.1
  port: 50051
  shard_mb: 8
  agents: []            # [{camera_id: cam0, token_sha256: <sha256 hex of its token>}]

storage:                # local | gcs
  type: local
  root: var/blobs

database:               # sqlite | postgres
  type: sqlite
  path: var/booth.db

queue:                  # sqlite | pubsub
  type: sqlite
  path: var/queue.db
  visibility_timeout_s: 60

trainer:
  size_px: 128
  label_map: skeleton   # skeleton | parts
  budget_s: 3600        # wall clock for loading, training, scoring and export
  batch: 4
  base_checkpoint: null # path or blob URI from `booth pretrain`
  strategy: auto        # auto | default | mirrored | tpu

render:
  side_by_side: true

links:
  expiry_days: 30

mail:                   # outbox (maildir, no SMTP) | smtp
  type: outbox
  maildir: var/maildir
  # type: smtp takes host, port, starttls, username, password, sender, reply_to, and
  # for bounces that come back after sending: bounce_address (the envelope sender)
  # and bounces_listen (host:port where booth serve takes mail for it)

web:
  host: 127.0.0.1
  port: 8000
  base_url: http://127.0.0.1:8000
  secret_key: changethis  # the app refuses to start until this is set
  staff: []             # [{username: staff, password_hash: <booth staff hash-password>}]
  login_attempts_per_minute: 5
  forwarded_allow_ips: 127.0.0.1  # the TLS proxy whose X-Forwarded-* headers are believed
  metrics_token: ""  # when set, /metrics needs "Authorization: Bearer <token>"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    sub.add_parser("example", help="print a commented default config")
    v = sub.add_parser(
        "validate",
        help="check a config file: name any bad key, and any secret still a placeholder",
        description="Exit 2 names each wrong key. A valid file is 'ok', or lists the secrets "
        "still placeholders, which the services refuse to start with. Relative paths in the "
        "file are relative to the directory the services run in, not to the file.",
    )
    v.add_argument("file", help="the booth's YAML config")


def run(args: argparse.Namespace) -> int:
    from cloud_trainer.config import load_config

    if args.config_command == "example":
        sys.stdout.write(EXAMPLE)
        return 0
    from cloud_trainer.config import placeholder_problems
    from edge_agent.config import read_yaml

    cfg = load_config(args.file)  # raises ConfigError with the exact key
    # What `booth serve`, `ingest` (and `agent`, for a file with an agent section) would
    # refuse to start with: said here, where ops check a file before deploying it.
    raw = read_yaml(args.file)
    sections = set(raw) if isinstance(raw, dict) else set()
    # A board's file (only an agent section, as deploy/config/agent.yaml) is checked as
    # the agent's: the cloud's secrets are not in it, and their defaults are not its.
    board_only = "agent" in sections and not sections & CLOUD_SECTIONS
    services = () if board_only else ("web", "ingest", "mail", "database")
    services += ("agent",) if "agent" in sections else ()
    placeholders = placeholder_problems(cfg, services)
    if placeholders:
        print(f"{args.file}: valid, but the services refuse to start while these secrets")
        print("are placeholders:")
        for p in placeholders:
            print(f"  {p}")
        return 0
    print(f"{args.file}: ok")
    return 0
