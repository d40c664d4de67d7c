"""``booth reference add|correct|show|list``: the reference dance library.

    booth reference add VIDEO --name NAME [--qa DIR]   pose + smoothing + QA report, new version
    booth reference show NAME [--version N] [--qa DIR] status, and the QA report copied to DIR
    booth reference correct NAME FILE [--qa DIR]       validate + apply a correction file
    booth reference list                               every stored and built-in reference
    booth reference remove NAME                        delete every version, source video too

``--config FILE`` goes before or after the action. Without it the embedded defaults
are used (blobs under ``var/blobs``, models under ``models/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_agent.errors import BadInput

CONFIG_HELP = "the booth YAML file (default: embedded defaults)"


EXAMPLES = [
    ("booth reference list", "what the tablet can offer"),
    ("booth reference add salsa.mp4 --name salsa --qa qa/", "a new dance, with its QA report"),
    ("booth reference correct salsa fixes.yaml", "fix poses the QA report flagged"),
    ("booth reference remove salsa", "every version and the source video"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=CONFIG_HELP)
    sub = p.add_subparsers(dest="reference_command", metavar="ACTION", required=True)
    a = sub.add_parser("add", help="process a video into a reference (a new version)")
    a.add_argument("video", help="the reference dancer's video (any format FFmpeg reads)")
    a.add_argument("--name", required=True, help="reference name: a-z, 0-9, '-', '_'")
    a.add_argument(
        "--min-detect-rate",
        type=float,
        default=None,
        help="refuse videos with a person in fewer frames than this (default 0.5)",
    )
    a.add_argument("--qa", metavar="DIR", help="also copy the QA report into DIR")
    c = sub.add_parser("correct", help="apply a correction file (YAML) as a new version")
    c.add_argument("name")
    c.add_argument("file", help="correction YAML (see the QA report's corrections-template.yaml)")
    c.add_argument("--qa", metavar="DIR", help="also copy the new QA report into DIR")
    s = sub.add_parser("show", help="print a reference's status")
    s.add_argument("name")
    s.add_argument("--version", type=int, help="a specific version (default: latest)")
    s.add_argument("--qa", metavar="DIR", help="copy the QA report into DIR")
    lst = sub.add_parser("list", help="list stored and built-in references")
    rm = sub.add_parser("remove", help="delete a reference: every version and its source video")
    rm.add_argument("name")
    for action in (a, c, s, lst, rm):
        # After the action too, as `booth staff logout`. SUPPRESS: an action without it
        # keeps the one given before the action (a default would overwrite it).
        action.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)


def _library(args: argparse.Namespace):
    from cloud_trainer.config import BoothConfig, load_config
    from cloud_trainer.reference import ReferenceLibrary
    from cloud_trainer.storage import create_blob_store
    from edge_agent.config import CpuPose

    cfg = load_config(args.config) if args.config else BoothConfig()
    pose = CpuPose(models_dir=cfg.models_dir, mode="tracking", segmentation=True)
    kwargs = {}
    if getattr(args, "min_detect_rate", None) is not None:
        kwargs["min_detect_rate"] = args.min_detect_rate
    return ReferenceLibrary(
        create_blob_store(cfg.storage), pose_cfg=pose, smoothing=cfg.agent.smoothing, **kwargs
    )


def _copy_qa(library, name: str, version: int, dest: str) -> Path:
    from cloud_trainer.reference import PREFIX, storage_key

    out = Path(dest)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--qa {dest}: is a file; give a directory for the QA report")
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{PREFIX}/{storage_key(name)}/v{version}/"
    for key in library.store.list(prefix + "qa/"):
        (out / key[len(prefix) + 3 :]).write_bytes(library.store.get(key))
    return out


def _print_status(library, name: str, version: int | None, qa: str | None) -> None:
    from cloud_trainer.reference import summary, summary_text

    ref = library.get(name, version)
    sys.stdout.write(summary_text(summary(ref)))
    print(f"versions    {', '.join(f'v{v}' for v in library.versions(name))}")
    if qa:
        print(f"QA report   {_copy_qa(library, name, ref.version, qa)}/")
    else:
        from cloud_trainer.reference import PREFIX, storage_key

        print(
            f"QA report   {PREFIX}/{storage_key(name)}/v{ref.version}/qa/ (copy it with --qa DIR)"
        )


def run(args: argparse.Namespace) -> int:
    library = _library(args)
    cmd = args.reference_command
    if cmd == "list":
        for r in library.catalogue():
            version = f"v{r['version']}" if r["version"] else "built-in (made on first use)"
            review = f"  needs review: {r['flagged']} flagged frames" if r["flagged"] else ""
            print(f"{r['name']:<28} {version}{review}")
        return 0
    if cmd == "remove":
        n = library.remove(args.name)
        print(f"removed {args.name}: {n} files, its source video included")
        return 0
    if cmd == "show":
        _print_status(library, args.name, args.version, args.qa)
        return 0
    if cmd == "add":
        ref = library.add(args.video, args.name, progress=_progress())
        sys.stderr.write("\n")
        _print_status(library, ref.name, ref.version, args.qa)
        return 0
    if cmd == "correct":
        ref = library.correct(args.name, args.file)
        print(f"applied {args.file}: {args.name} is now v{ref.version}")
        _print_status(library, ref.name, ref.version, args.qa)
        return 0
    return 2


def _progress():
    def report(frames: int) -> None:
        if frames % 25 == 0:
            sys.stderr.write(f"\rpose: {frames} frames")
            sys.stderr.flush()

    return report
