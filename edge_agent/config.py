"""Settings for one edge agent, and the strict YAML loader shared by the whole booth.

Every model forbids unknown keys, so a typo in the YAML is an error that names
the key instead of a setting silently ignored. Backends (camera sources, pose
backends) are discriminated unions on ``type``: adding one touches its own file
plus one line here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Values that mean "nobody set this secret yet". Services refuse to start with them.
PLACEHOLDER_SECRETS = frozenset({"changethis", "change-me", "changeme", ""})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _parse_size(value: Any) -> tuple[int, int]:
    """Accept ``640x480``, ``[640, 480]`` or ``(640, 480)``; reject zero or negative sizes."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) != 2:
            raise ValueError(f"size must look like 640x480, got {value!r}")
        try:
            value = (int(parts[0]), int(parts[1]))
        except ValueError:
            raise ValueError(f"size must look like 640x480, got {value!r}") from None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"size must be WIDTHxHEIGHT (quote it in YAML: '640x480'), got {value!r}")
    try:
        w, h = int(value[0]), int(value[1])
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"size must be two whole numbers of pixels, got {value!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {w}x{h}")
    if w % 2 or h % 2:
        raise ValueError(
            f"size must be even in both dimensions (video encoders need it), got {w}x{h}"
        )
    return w, h


Size = Annotated[tuple[int, int], Field(description="WIDTHxHEIGHT in pixels")]
# A booth's or a camera's id: it names spool folders and blob keys, and the database
# keeps it in 64 characters (PostgreSQL refuses a longer one; SQLite would not).
IDENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
IDENT_RULE = "up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
Ident = Annotated[str, Field(pattern=IDENT_PATTERN, description=IDENT_RULE)]


# ---- camera sources ---------------------------------------------------------


class SyntheticSource(Strict):
    """The synthetic booth as a camera: pre-rendered JPEGs replayed at an exact rate."""

    type: Literal["synthetic"] = "synthetic"
    attendee: int = Field(1, ge=0, description="appearance seed")
    dance: int = Field(1, ge=0, description="choreography seed")
    viewpoint: int = Field(0, ge=0, description="camera viewpoint index within the booth")
    size: Size = (640, 480)
    fps: float = Field(120.0, gt=0, le=1000)
    jpeg_quality: int = Field(85, ge=10, le=100)
    device_buffers: int = Field(
        32,
        ge=1,
        le=1024,
        description="frames held for a reader that falls behind; more arriving are lost "
        "(a UVC driver allows 32)",
    )

    _v_size = field_validator("size", mode="before")(classmethod(lambda cls, v: _parse_size(v)))


class V4L2Source(Strict):
    """A USB camera through Video4Linux, asked for MJPEG so nothing is decoded."""

    type: Literal["v4l2"] = "v4l2"
    device: str = "/dev/video0"
    size: Size = (640, 480)
    fps: float = Field(120.0, gt=0, le=1000)

    _v_size = field_validator("size", mode="before")(classmethod(lambda cls, v: _parse_size(v)))


class FileSource(Strict):
    """A recorded video (MJPEG in MP4/AVI, or any codec FFmpeg reads) replayed as a camera."""

    type: Literal["file"] = "file"
    path: Path
    rate: Literal["native", "max"] = "native"
    loop: bool = False


SourceConfig = Annotated[SyntheticSource | V4L2Source | FileSource, Field(discriminator="type")]


# ---- pose backends ------------------------------------------------------------


class CpuPose(Strict):
    """BlazePose (detector + full landmark model) and selfie segmentation on LiteRT/XNNPACK."""

    type: Literal["cpu"] = "cpu"
    models_dir: Path = Path("models")
    threads: int = Field(2, ge=1, le=64)
    mode: Literal["tracking", "full"] = "tracking"
    segmentation: bool = True
    min_detection_score: float = Field(0.5, ge=0, le=1)


class EdgeTpuPose(Strict):
    """MoveNet-style models on one or more Coral EdgeTPUs, shared as a pool."""

    type: Literal["edgetpu"] = "edgetpu"
    model: Path = Path("models/movenet_thunder_edgetpu.tflite")
    devices: list[str] = Field(default_factory=lambda: ["usb:0"], min_length=1)
    library: str = "libedgetpu.so.1"
    # When the delegate cannot load: use the CPU backend (True) or refuse to start.
    fallback_to_cpu: bool = True
    # Load each delegate and run one frame in a child process first: a libedgetpu built
    # for another TFLite version crashes (SIGSEGV) rather than raising, which would take
    # the agent down before any fallback; the child's crash is a cause like any other.
    probe_timeout_s: float = Field(60.0, ge=0, description="0 skips the probe")
    cpu: CpuPose = Field(default_factory=CpuPose)


PoseConfig = Annotated[CpuPose | EdgeTpuPose, Field(discriminator="type")]


# ---- the rest of the agent ------------------------------------------------------


class CaptureConfig(Strict):
    out_dir: Path = Path("var/takes")
    segment_s: float = Field(2.0, gt=0, le=600)
    stream_buffer_frames: int = Field(1024, ge=1)
    # Stop recording cleanly when free disk falls below this.
    min_free_disk_mb: int = Field(200, ge=0)
    # Keep a take's recording after ingest confirmed it complete (see edge_agent.retention).
    keep_uploaded_takes: bool = False
    # A camera silent this long mid-take (USB brownout, a cable half out) is stuck in a read
    # only a restart frees: `booth agent` exits (code 3) for its supervisor to restart it;
    # the spool resumes the upload. 0 never restarts (the tablet still shows the stall).
    stall_restart_s: float = Field(20.0, ge=0)


class SmoothingConfig(Strict):
    window: int = Field(32, ge=4, le=1024, description="ring-buffer length per camera")
    max_gap_frames: int = Field(8, ge=0, description="longest run of missing frames to impute")
    min_score: float = Field(0.3, ge=0, le=1)
    min_cutoff_hz: float = Field(1.5, gt=0)
    beta: float = Field(0.02, ge=0)
    d_cutoff_hz: float = Field(1.0, gt=0)
    max_bone_change: float = Field(
        0.35, gt=0, description="relative bone-length change that flags a glitch"
    )
    max_speed_body_per_s: float = Field(
        25.0, gt=0, description="joint speed, in torso lengths per second"
    )
    # The Kalman smoother (edge_agent/smoothing.py); min_cutoff_hz, beta and
    # d_cutoff_hz above configure the One Euro baseline.
    meas_noise_px: float = Field(
        2.0, gt=0, description="detector noise at score 1 (pixels) until it is learnt"
    )
    noise_learn_rate: float = Field(
        0.02, ge=0, le=1, description="per-frame EMA rate of the learnt detector noise"
    )
    accel_noise_psd: float = Field(
        3.0e5, gt=0, description="white-acceleration spectral density, px^2/s^3"
    )
    max_noise_boost: float = Field(
        50.0, ge=1, description="most the process noise may grow when the dancer surprises"
    )
    noise_adapt_rate: float = Field(0.2, gt=0, le=1, description="per-frame EMA rate")
    noise_trim_rate: float = Field(
        0.1, ge=0, le=1, description="per-frame step of the process-noise trim (log units)"
    )
    gate_chi2: float = Field(16.0, gt=0, description="innovation gate, chi-square with 2 dof")
    reject_chi2: float = Field(
        128.0, gt=0, description="innovation beyond which a measurement is refused outright"
    )
    max_reject_frames: int = Field(
        6, ge=0, description="consecutive rejections after which a track restarts"
    )
    velocity_decay_hz: float = Field(
        5.0, ge=0, description="how fast predicted velocity relaxes to zero; 0 = constant velocity"
    )
    init_speed_px_s: float = Field(500.0, gt=0, description="prior speed spread of a new track")
    offline_max_gap_frames: int = Field(
        30, ge=0, description="longest interior gap the offline smoother interpolates"
    )


class ZoneConfig(Strict):
    """The booth's floor zone in normalised image coordinates; keypoints outside are rejected."""

    polygon: list[tuple[float, float]] = Field(
        default_factory=lambda: [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)], min_length=3
    )
    require_mask_overlap: float = Field(0.3, ge=0, le=1)
    # The dance floor as this camera sees it (normalised). When set, a person's confident
    # foot points must touch it: a wall shadow's feet are on the wall.
    floor_polygon: list[tuple[float, float]] | None = Field(None, min_length=3)
    # Grey-level spread (5th..95th percentile) around the eyes and nose that counts as a
    # visible face; a wall shadow has none. 0 disables the check.
    min_face_contrast: float = Field(40.0, ge=0, le=255)

    @field_validator("polygon", "floor_polygon")
    @classmethod
    def _an_area_in_the_frame(
        cls, v: list[tuple[float, float]] | None
    ) -> list[tuple[float, float]] | None:
        # Pixels instead of fractions, or points on one line, would refuse every person,
        # with no word anywhere but a debug log.
        if v is None:
            return v
        if any(not (0.0 <= c <= 1.0) for point in v for c in point):
            raise ValueError(
                "points are fractions of the frame (0..1, x then y), not pixels: "
                f"{[list(p) for p in v]}"
            )
        twice_area = sum(
            x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(v, v[1:] + v[:1], strict=True)
        )
        if abs(twice_area) / 2 < 1e-4:
            raise ValueError("the points enclose no area (repeated, or on one line)")
        return v


class TlsClient(Strict):
    ca_cert: Path | None = None
    server_name: str | None = None


class UplinkConfig(Strict):
    """Where the agent streams to, and the disk spool that makes uploads survive crashes."""

    address: str = "127.0.0.1:50051"
    token: str = "changethis"
    tls: TlsClient | None = None
    spool_dir: Path = Path("var/spool")
    spool_budget_mb: int = Field(2048, ge=1)
    max_message_mb: int = Field(16, ge=1, le=512)
    backoff_initial_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(10.0, gt=0)


class AgentConfig(Strict):
    booth_id: Ident = "booth-1"
    camera_id: Ident = "cam0"
    source: SourceConfig = Field(default_factory=SyntheticSource)
    pose: PoseConfig = Field(default_factory=CpuPose)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    smoothing: SmoothingConfig = Field(default_factory=SmoothingConfig)
    zone: ZoneConfig = Field(default_factory=ZoneConfig)
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)
    status_port: int = Field(0, ge=0, le=65535, description="HTTP status endpoint; 0 disables it")


# ---- loading ---------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file that cannot be used. ``str(err)`` is one readable line per problem."""


M = TypeVar("M", bound=BaseModel)


def _key_path(loc: tuple[Any, ...], data: Any) -> str:
    """The dotted YAML key for a pydantic error location.

    Discriminated unions put the tag (``cpu``) into the location although it is
    not a key in the file; walking the input drops such steps.
    """
    parts: list[str] = []
    node = data
    for step in loc:
        if isinstance(node, dict):
            if step in node:
                parts.append(str(step))
                node = node[step]
            elif (
                isinstance(step, str)
                and not step.startswith("function-")
                and not _is_union_tag(node, step)
            ):
                parts.append(step)
                node = None
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            parts.append(str(step))
            node = node[step]
        elif node is None and not str(step).startswith("function-"):
            parts.append(str(step))
    return ".".join(parts)


def _is_union_tag(node: dict, step: str) -> bool:
    """True if ``step`` is the discriminator value of ``node`` rather than a key."""
    return node.get("type") == step


def _union_tags(model: Any, loc: tuple) -> list[str]:
    """The ``type`` values the union at ``loc`` of ``model`` accepts ([] if not found)."""
    import typing

    ann: Any = model
    for step in loc:
        while typing.get_origin(ann) is Annotated:
            ann = typing.get_args(ann)[0]
        if isinstance(step, int):
            args = typing.get_args(ann)  # list[X] / tuple[X, ...]
            ann = args[0] if args else None
        elif isinstance(ann, type) and issubclass(ann, BaseModel) and step in ann.model_fields:
            ann = ann.model_fields[step].annotation
        else:
            return []
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    tags = []
    for member in typing.get_args(ann):
        field = getattr(member, "model_fields", {}).get("type")
        if field is not None and isinstance(field.default, str):
            tags.append(field.default)
    return tags


def format_validation_error(
    err: ValidationError, prefix: str = "", data: Any = None, model: Any = None
) -> str:
    lines = []
    for e in err.errors():
        loc = _key_path(e["loc"], data)
        # Discriminated unions insert the tag into the location; keep it readable.
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] == IDENT_PATTERN:
            msg = f"{e['input']!r} cannot be an id: use {IDENT_RULE}"
        elif e["type"] == "union_tag_invalid":
            key = f"{key}.type"
            msg = f"unknown type {e['input'].get('type')!r}; expected one of {e['ctx']['expected_tags']}"
        elif e["type"] == "union_tag_not_found":
            # `storage: {root: ...}` without `type: local`: say which key, and its choices.
            key = f"{key}.type"
            tags = _union_tags(model, tuple(e["loc"])) if model is not None else []
            choices = ", ".join(repr(t) for t in tags) or "see `booth config example`"
            msg = f"missing: this section needs its type ({choices})"
        lines.append(f"{key}: {msg}")
    return "\n".join(lines)


def flags_error(err: ValidationError, flags: dict[str, str], prefix: str = "") -> str:
    """``err`` as one line for a command's flags: each refused flag (named as typed,
    ``flags`` maps setting to flag) or other setting (``prefix`` + key), and why."""
    out = []
    for line in format_validation_error(err).splitlines():
        key, _, reason = line.partition(": ")
        out.append(f"{flags[key]}: {reason}" if key in flags else f"{prefix}{line}")
    return "; ".join(out)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, environ: Mapping[str, str], source: str = "config") -> str:
    """Replace ``${NAME}`` and ``${NAME:-default}`` so secrets can come from the environment.

    As in the shell and in compose, ``:-`` also takes the default when NAME is set but
    empty: an env file's ``BOOTH_TIMEZONE=`` line means "not chosen", not "no zone".
    """

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ and (environ[name] != "" or default is None):
            return environ[name]
        if default is not None:
            return default
        line = text.count("\n", 0, m.start()) + 1
        raise ConfigError(f"{source}: line {line}: environment variable {name} is not set")

    return _ENV_RE.sub(sub, text)


def expand_env_values(
    data: Any, environ: Mapping[str, str], source: str = "config", where: str = ""
) -> Any:
    """``expand_env`` on each string value of parsed YAML: what the environment holds stays text.

    Substituting into the file's text first let a value's characters be read as YAML:
    a password with `` #`` lost its end to a comment, one starting with ``@`` or ``*``
    or holding ``: `` broke the file, ``12345678`` became a number. A value that is
    all digits still reaches a numeric setting, which converts it.
    """
    if isinstance(data, dict):
        return {
            k: expand_env_values(v, environ, source, f"{where}.{k}" if where else str(k))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [expand_env_values(v, environ, source, f"{where}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data:
        try:
            return expand_env(data, environ, source)
        except ConfigError:
            name = _ENV_RE.search(data)
            raise ConfigError(
                f"{source}: {where}: environment variable "
                f"{name.group(1) if name else '?'} is not set"
            ) from None
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_yaml(path: str | Path, environ: Mapping[str, str] | None = None) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except (ValueError, IndexError, TypeError, RecursionError) as e:
        # PyYAML's constructors raise these (not YAMLError) for a bad explicit tag such
        # as ``!!int x``, a number past Python's digit limit, or absurdly deep nesting.
        raise ConfigError(f"{p}: malformed YAML: {_first_line(e)}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{where}: malformed YAML: {problem}") from None
    data = expand_env_values(data, os.environ if environ is None else environ, str(p))
    return {} if data is None else data


def parse_model(data: Any, model: type[M], *, source: str = "config", prefix: str = "") -> M:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            f"{source}: invalid:\n{format_validation_error(e, prefix, data, model)}"
        ) from None


# The top-level sections of a booth file (cloud_trainer.config.BoothConfig's fields); a
# board reads only ``agent`` but refuses a key no section has.
BOOTH_SECTIONS = frozenset(
    {"booth", "models_dir", "agent", "ingest", "storage", "database", "queue", "trainer"}
    | {"render", "links", "mail", "web"}
)


def load_agent_config(path: str | Path) -> AgentConfig:
    """Load the ``agent:`` section of a booth YAML file (a board's file may hold only that)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys")
    unknown = sorted(str(k) for k in data if k not in BOOTH_SECTIONS)
    if unknown:
        # A misspelt "agent:" would leave the board on defaults (and a placeholder token).
        agent_keys = [k for k in unknown if k in AgentConfig.model_fields]
        hint = f"; put {', '.join(agent_keys)} under agent:" if agent_keys else ""
        raise ConfigError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)} (a booth file has "
            f"{', '.join(sorted(BOOTH_SECTIONS))}){hint}"
        )
    section = data.get("agent", {})
    return parse_model(section or {}, AgentConfig, source=str(path), prefix="agent.")
