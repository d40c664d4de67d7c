import os
import subprocess
import sys

import pytest

from cloud_trainer.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cloud_trainer.cli", *args], capture_output=True, text=True
    )


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in ("config", "synth"):
        assert name in r.stdout


def _every_example():
    import importlib
    import shlex

    from cloud_trainer import cli

    found = [("booth", cmd) for cmd, _ in cli.EXAMPLES]
    for name, (module_name, _help) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        found += [(name, cmd) for cmd, _ in getattr(module, "EXAMPLES", [])]
    return [(where, shlex.split(cmd.split(">")[0])) for where, cmd in found]


def test_every_example_in_the_help_is_a_command_line_the_parser_takes():
    """Examples rot when flags change: each one shown by --help must still parse."""
    from cloud_trainer.cli import build_parser

    parser = build_parser()
    examples = _every_example()
    assert {where for where, _ in examples} >= {"booth", "agent", "reference", "staff"}
    for where, argv in examples:
        assert argv[0] == "booth", (where, argv)
        if where != "booth":
            assert argv[1] == where, f"an example under `booth {where} --help`: {argv}"
        args = parser.parse_args(argv[1:])  # argparse exits (SystemExit) on a stale flag
        assert getattr(args, "_run", None), argv
    r = run_cli("agent", "--help")
    assert "examples:" in r.stdout and "--take-seconds 5" in r.stdout


def test_unknown_command_is_one_line_error():
    r = run_cli("dance-off")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_config_example_prints_yaml(capsys):
    assert main(["config", "example"]) == 0
    assert "storage:" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["config", "validate", "/nonexistent/booth.yaml"]])
def test_bad_files_give_one_line_errors(cmd):
    r = run_cli(*cmd)
    assert r.returncode == 2
    assert "no such file" in r.stderr and "Traceback" not in r.stderr


def _validate(tmp_path, yaml_text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "booth.yaml"
    path.write_text(yaml_text)
    return run_cli("config", "validate", str(path))


def test_a_base_checkpoint_in_the_configured_bucket_may_be_named_by_its_gs_url(tmp_path):
    from cloud_trainer.config import load_config

    gcs = "storage:\n  type: gcs\n  bucket: booth-bucket\n"
    path = tmp_path / "booth.yaml"
    path.write_text(gcs + "trainer:\n  base_checkpoint: gs://booth-bucket/base/booth-1/\n")
    assert load_config(path).trainer.base_checkpoint == "blob:base/booth-1"
    # Another bucket (or scheme) is nowhere a worker reads from: said at start-up.
    r = _validate(tmp_path, gcs + "trainer:\n  base_checkpoint: gs://elsewhere/base/booth-1\n")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "read bases only from the gcs bucket 'booth-bucket'" in r.stderr
    assert "blob:<prefix>" in r.stderr


@pytest.mark.parametrize("given", ["flag", "env"])
def test_a_database_that_cannot_be_reached_is_one_line_not_a_traceback(tmp_path, given):
    from smtp_capture import free_port

    path = tmp_path / "booth.yaml"
    url = f"postgresql+psycopg://booth:wrong@127.0.0.1:{free_port()}/booth?connect_timeout=5"
    path.write_text(f"database:\n  type: postgres\n  url: {url}\n")
    if given == "flag":
        r = run_cli("staff", "logout", "ada", "--config", str(path))
    else:  # in a container: BOOTH_CONFIG names the booth's file, not the embedded defaults
        env = {**os.environ, "BOOTH_CONFIG": str(path)}
        r = subprocess.run(
            [sys.executable, "-m", "cloud_trainer.cli", "staff", "logout", "ada"],
            capture_output=True,
            text=True,
            env=env,
        )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "the database cannot be reached or refused the login" in r.stderr
    assert "wrong" not in r.stderr  # the password in the URL


# ---- booth demo: arguments first, and only its own workdir deleted --------------------


@pytest.fixture
def demo_runs(monkeypatch):
    """The plans `booth demo` would have run (the real demo takes minutes)."""
    import cloud_trainer.demo

    plans = []
    monkeypatch.setattr(cloud_trainer.demo, "run_demo", lambda plan, **kw: plans.append(plan) or {})
    return plans


def test_demo_refuses_to_delete_a_directory_it_did_not_make(tmp_path, demo_runs, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    assert main(["demo", "--workdir", str(precious)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not made by booth demo" in err
    assert (precious / "chapter1.tex").read_text() == "years of work"
    assert demo_runs == []


@pytest.mark.parametrize("state", ["missing", "empty", "made by the demo"])
def test_demo_starts_afresh_in_a_directory_it_may_use(tmp_path, demo_runs, state):
    workdir = tmp_path / "demo"
    if state != "missing":
        workdir.mkdir()
    if state == "made by the demo":
        assert main(["demo", "--workdir", str(workdir)]) == 0  # marks it as the demo's
        (workdir / "booth.db").write_text("the last run's state")
    assert main(["demo", "--workdir", str(workdir)]) == 0
    assert demo_runs[-1].workdir == workdir
    assert not (workdir / "booth.db").exists()  # a fresh booth each run
    # ... and the next run may delete it again.
    assert main(["demo", "--workdir", str(workdir)]) == 0


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--train-size", "100"], "--train-size: must be a power of two"),
        (["--train-size", "1024"], "--train-size: Input should be less than or equal to 512"),
        (["--budget-s", "0"], "--budget-s: Input should be greater than 0"),
        (["--seconds", "0"], "--seconds: Input should be greater than 0"),
        (["--seconds", "nan"], "--seconds must be a finite number, got nan"),
        (["--budget-s", "inf"], "--budget-s must be a finite number, got inf"),
        (["--fps", "5000"], "--fps: Input should be less than or equal to 1000"),
        (["--cameras", "0"], "--cameras"),
        (["--size", "641x480"], "size must be even"),
        (["--reference", "salsa"], "only synthetic references"),
        (["--reference", "synthetic:moonwalk"], "unknown dance move 'moonwalk'"),
        (["--reference", "synthetic:Warm Up"], "invalid synthetic dance"),
    ],
)
def test_demo_checks_every_argument_before_touching_its_workdir(
    tmp_path, demo_runs, capsys, flags, says
):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir)]) == 0  # made by the demo: deletable
    (workdir / "booth.db").write_text("the last run's state")
    capsys.readouterr()
    assert main(["demo", "--workdir", str(workdir), *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert (workdir / "booth.db").exists()  # nothing deleted for a run that cannot start
    assert len(demo_runs) == 1


# ---- booth pretrain: settings errors name the flag ------------------------------------


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--size", "100", "--size: must be a power of two (32, 64, 128, 256 or 512), not 100"),
        ("--size", "16", "--size: Input should be greater than or equal to 32"),
        ("--batch", "0", "--batch: Input should be greater than or equal to 1"),
        ("--steps", "0", "--steps: Input should be greater than or equal to 1"),
        ("--budget-s", "-5", "--budget-s: Input should be greater than 0"),
    ],
)
def test_pretrain_bad_settings_name_the_flag_and_the_reason(tmp_path, capsys, flag, value, says):
    assert main(["pretrain", "--out", str(tmp_path / "pt"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"booth pretrain: bad training setting: {says}"
    assert not (tmp_path / "pt").exists()


# ---- port flags are range-checked by argparse -----------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["serve", "--config", "booth.yaml", "--grpc-port", "70000"], "--grpc-port"),
        (["serve", "--config", "booth.yaml", "--http-port", "70000"], "--http-port"),
        (["serve", "--config", "booth.yaml", "--http-port", "-1"], "--http-port"),
        (["ingest", "--config", "booth.yaml", "--port", "65536"], "--port"),
    ],
)
def test_a_port_out_of_range_is_refused_by_argparse(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"booth {argv[0]}: error: argument {flag}: must be 0..65535"), err
    assert len(err.strip().splitlines()) == 1


def test_port_zero_still_means_any_free_port():
    from cloud_trainer.cli import build_parser

    args = build_parser().parse_args(["serve", "--config", "x", "--grpc-port", "0"])
    assert args.grpc_port == 0 and args.http_port is None
    assert build_parser().parse_args(["ingest", "--port", "65535"]).port == 65535


# ---- -v and -vv -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, booth_debug, library_debug",
    [([], False, False), (["-v"], True, False), (["-vv"], True, True)],
)
def test_verbose_flags_turn_on_debug_logging(flags, booth_debug, library_debug):
    code = (
        "import logging, sys\n"
        "from cloud_trainer.cli import main\n"
        "main(sys.argv[1:])\n"
        "on = lambda name: logging.getLogger(name).isEnabledFor(logging.DEBUG)\n"
        "print(on('cloud_trainer.worker'), on('edge_agent.uplink'), on('urllib3'))\n"
        "info = lambda name: logging.getLogger(name).isEnabledFor(logging.INFO)\n"
        "print(info('cloud_trainer.demo'), info('httpx'))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *flags, "config", "example"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    *_, worker, uplink, urllib3, booth_info, httpx_info = r.stdout.split()
    assert [worker, uplink, urllib3] == [str(booth_debug), str(booth_debug), str(library_debug)]
    # The booth's own news is always shown; a library's (a line per HTTP request) only
    # with -vv: it would bury the demo's progress.
    assert (booth_info, httpx_info) == ("True", str(library_debug))
    assert logging_help_is_truthful(run_cli("--help").stdout)


def logging_help_is_truthful(help_text: str) -> bool:
    return "-v: debug logging from the booth" in " ".join(help_text.split())


# ---- booth reference: --config before or after the action -----------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_reference_takes_config_before_or_after_the_action(tmp_path, capsys, where):
    path = tmp_path / "booth.yaml"
    path.write_text(f"storage:\n  type: local\n  root: {tmp_path / 'blobs'}\n")
    flag = ["--config", str(path)]
    argv = ["reference", *flag, "list"] if where == "before" else ["reference", "list", *flag]
    assert main(argv) == 0
    assert "synthetic:warmup" in capsys.readouterr().out
    assert (tmp_path / "blobs").is_dir()  # the booth file's store, not the embedded default


def test_reference_config_after_the_action_is_read(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["reference", "show", "synthetic:warmup", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and str(missing) in err


def test_demo_still_starts_afresh_in_the_default_dir_an_older_demo_left(
    tmp_path, monkeypatch, demo_runs
):
    """Demos before the marker left var/demo without it: the next `make demo` must not
    refuse it. Only the default dir with the demo's own config and logs counts."""
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "var" / "demo"
    (old / "logs").mkdir(parents=True)
    (old / "booth.yaml").write_text("booth: {id: demo}\n")
    assert main(["demo", "--no-progress"]) == 0
    assert (old / ".booth-demo").is_file() and not (old / "logs").exists()
    # The same layout anywhere else is someone's booth: refused.
    mine = tmp_path / "mine"
    (mine / "logs").mkdir(parents=True)
    (mine / "booth.yaml").write_text("booth: {id: real}\n")
    assert main(["demo", "--no-progress", "--workdir", str(mine)]) == 2
    assert (mine / "booth.yaml").exists()


def test_log_lines_keep_their_fields():
    """The ids a line is logged with (extra=) tie it to a session: they used to be dropped."""
    import logging

    from cloud_trainer.cli import FieldsFormatter

    record = logging.makeLogRecord(
        {
            "name": "cloud_trainer.worker",
            "levelname": "WARNING",
            "msg": "job failed",
            "session_id": "abc123",
            "reason": "no camera saw the attendee whole",
            "steps": 3,
        }
    )
    line = FieldsFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == (
        "WARNING cloud_trainer.worker: job failed session_id=abc123 "
        'reason="no camera saw the attendee whole" steps=3'
    )
