"""The run-folder protocol between a background training worker and whoever watches it (the ComfyUI job
manager, a script, a person with a shell).

One folder per run. The submitter writes ``job.json`` (and, for text families, ``conditioning.safetensors``)
and starts ``python -m distill_core.worker --run-dir DIR``; from then on the worker reports only through files:

    job.json           what to train: the run config, the base model's name and size, the prompts' identities, GPU
                       sharing (read-only for the worker)
    fingerprint.json   what the run was first started with; a later start whose fingerprint differs is refused
    lock               an OS file lock the live worker holds for its whole life (released by the OS on any exit,
                       kill -9 included), so two workers never share a folder and a watcher can tell "alive"
    heartbeat.json     {pid, time, iteration, phase}, rewritten every few seconds by a thread of the worker
    metrics.jsonl      one JSON line per iteration (written by ``runtime.run_training``)
    previews/NNNNN.png preview grids; state.safetensors and student.safetensors: atomic checkpoints
    stop               a stop request: the worker saves a checkpoint and the student, then exits
    status.json        the worker's last word: {state: done | stopped | failed, iteration, message, student}
    worker.log         the worker's stdout and stderr (the submitter redirects them there)
    export.json        the ComfyUI side's record of where it exported the finished student (``ExportRecord``)

Each JSON file is a record class here (``JobSpec``, ``Beat``, ``Status``, ``ExportRecord``), read leniently and
written atomically; ``JobState`` names every state a job is shown in. A writer enters a folder only through
``OpenRun`` (the lock, and the fingerprint checked once). Reading imports neither torch nor ComfyUI, so the
ComfyUI process can read run folders cheaply.
"""

from __future__ import annotations

import enum
import math
import hashlib
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import IO, ClassVar

from xslim_core.files import atomic_path

JOB, FINGERPRINT, LOCK, HEARTBEAT = "job.json", "fingerprint.json", "lock", "heartbeat.json"
METRICS, STOP, STATUS, LOG = "metrics.jsonl", "stop", "status.json", "worker.log"
PREVIEWS, STUDENT, STATE, CONDITIONING = (
    "previews",
    "student.safetensors",
    "state.safetensors",
    "conditioning.safetensors",
)
EXPORT = "export.json"
JOB_FORMAT = "xslim-distill-job/1"


class JobState(str, enum.Enum):
    """Every state a job is shown in (the jobs panel's vocabulary). A worker's own last word is one of
    ``FINAL_STATES``; the others are what a watcher concludes from the lock, the heartbeat and the stop file."""

    STARTING = "starting"  # the worker holds the folder and is loading the model
    RUNNING = "running"
    STOPPING = "stopping"  # a stop was asked; the worker saves and exits
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # no worker and no last word: it was killed or the machine restarted
    DAMAGED = "damaged"  # the run folder's files cannot be made sense of


FINAL_STATES = tuple(s.value for s in (JobState.DONE, JobState.STOPPED, JobState.FAILED))
ACTIVE_STATES = tuple(s.value for s in (JobState.STARTING, JobState.RUNNING, JobState.STOPPING))
RESUMABLE_STATES = tuple(s.value for s in (JobState.STOPPED, JobState.INTERRUPTED, JobState.FAILED))
HEARTBEAT_EVERY_S = 2.0
# A heartbeat older than this, with no final status, means the worker is gone (used where file locks do not work).
STALE_AFTER_S = 30.0
# Settings a resumed run may change: how long it trains and how often it reports. Everything else shapes the
# result, so changing it would silently mix two different trainings in one checkpoint.
RESUMABLE = (
    "iterations",
    "max_minutes",
    "threads",
    "checkpoint_every",
    "preview_every",
    "run_dir",
    "device",
    "parallel",
    "memory_budget_gib",
    "offload_optimizer",
)  # placement and budget: a run may resume elsewhere


def write_json(path: str, data: dict) -> None:
    """Atomic: a reader never sees half a file, two writers (the server's threads, a worker) never share a temporary
    file and a planted link is never written through (``xslim_core.files.atomic_path``). Readable by all: job files
    are read by the ComfyUI process and by people."""
    with atomic_path(path, overwrite=True, mode=0o644) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)


JSON_LIMIT = 1 << 20  # bytes: run-folder JSON files are small; a larger one is damaged, not read
METRICS_CHUNK = 8 << 20  # bytes of metrics.jsonl read per call (the rest on the next)


def read_json(path: str) -> dict | None:
    """None for a missing, unreadable, oversized or malformed file (a watcher must never crash on a worker's
    files): too deep (RecursionError), not an object, or larger than JSON_LIMIT."""
    try:
        with open(path, "rb") as f:
            raw = f.read(JSON_LIMIT + 1)
        if len(raw) > JSON_LIMIT:
            return None
        data = json.loads(raw)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def json_safe(value):
    """``value`` with every non-finite float (a NaN loss, an infinite ETA) as None, so that what a route sends
    is JSON a browser can parse (Python's json writes NaN, which JSON does not have)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value) -> str:
    """The one serializer of the jobs routes: never emits NaN or Infinity."""
    return json.dumps(json_safe(value), allow_nan=False)


def mapping(value) -> dict:
    """``value`` when it is a JSON object, else {} (a damaged file says nothing)."""
    return value if isinstance(value, dict) else {}


def count(value) -> int | None:
    """A non-negative whole number from a run file, else None (a damaged file says nothing)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# -- the run folder's files as records ------------------------------------------------------------------------
class RunFile:
    """One file of the run folder as a record: read leniently (a damaged field reads as unknown, a damaged file
    as None), written atomically."""

    FILE: ClassVar[str]

    @classmethod
    def read(cls, run_dir: str):
        data = read_json(os.path.join(run_dir, cls.FILE))
        return None if data is None else cls.from_json(data)

    @classmethod
    def from_json(cls, data: dict):
        raise NotImplementedError

    def to_json(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass

    def write(self, run_dir: str) -> None:
        write_json(os.path.join(run_dir, self.FILE), self.to_json())


@dataclass
class JobSpec(RunFile):
    """job.json: what to train, written by the submitter, read-only for the worker."""

    FILE: ClassVar[str] = JOB
    config: dict
    base: dict
    gpu: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)  # {"overwrite": bool}: may the export replace a student file
    created: float | None = None
    bootstrap: dict | None = None  # what the worker makes importable first (``worker.bootstrap``)
    format: str = JOB_FORMAT

    @classmethod
    def from_json(cls, data: dict) -> "JobSpec":
        return cls(
            config=mapping(data.get("config")),
            base=mapping(data.get("base")),
            gpu=mapping(data.get("gpu")),
            export=mapping(data.get("export")),
            created=_number(data.get("created")),
            bootstrap=data.get("bootstrap") or None,
            format=data["format"] if isinstance(data.get("format"), str) else "",
        )

    def to_json(self) -> dict:
        data = {
            "format": self.format,
            "config": self.config,
            "base": self.base,
            "gpu": self.gpu,
            "export": self.export,
            "created": self.created,
        }
        return {**data, "bootstrap": self.bootstrap} if self.bootstrap else data


@dataclass
class Status(RunFile):
    """status.json: the worker's last word (or the watcher's, for a worker that died without one). Read as None
    when it names no final state."""

    FILE: ClassVar[str] = STATUS
    state: str  # one of FINAL_STATES
    iteration: int | None = None
    message: str = ""
    student: str | None = None
    time: float | None = None
    pid: int | None = None
    error: str | None = None  # the traceback of a failure
    crashed: bool | None = None  # written by the watcher: the worker ended without a status
    exit_code: int | None = None

    @classmethod
    def from_json(cls, data: dict) -> "Status | None":
        if data.get("state") not in FINAL_STATES:
            return None
        message, student = data.get("message", ""), data.get("student")
        return cls(
            state=data["state"],
            iteration=count(data.get("iteration")),
            message=message if isinstance(message, str) else "",
            student=student if isinstance(student, str) else None,
            time=_number(data.get("time")),
        )

    def to_json(self) -> dict:
        data = {"state": self.state, "iteration": self.iteration, "message": self.message, "student": self.student}
        extra = {
            "crashed": self.crashed,
            "exit_code": self.exit_code,
            "error": self.error,
            "time": self.time,
            "pid": self.pid,
        }
        return {**data, **{k: v for k, v in extra.items() if v is not None}}


@dataclass
class Beat(RunFile):
    """heartbeat.json: the live worker's pulse, rewritten every HEARTBEAT_EVERY_S by a thread of the worker."""

    FILE: ClassVar[str] = HEARTBEAT
    pid: int | None = None
    pgid: int | None = None  # what a watcher signals to stop the whole job
    started: float | None = None
    iteration: int | None = None
    iterations: int | None = None
    phase: str = "loading"  # loading, training, exited
    time: float | None = None

    @classmethod
    def from_json(cls, data: dict) -> "Beat":
        return cls(
            pid=count(data.get("pid")),
            pgid=count(data.get("pgid")),
            started=_number(data.get("started")),
            iteration=count(data.get("iteration")),
            iterations=count(data.get("iterations")),
            phase=data.get("phase", "loading"),
            time=_number(data.get("time")),
        )

    def to_json(self) -> dict:
        return {**asdict(self), "time": time.time()}  # the time of writing: what a watcher's age is measured from


@dataclass
class ExportRecord(RunFile):
    """export.json: which file of the students folder holds this run's student, and from which iteration."""

    FILE: ClassVar[str] = EXPORT
    student: str | None
    path: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    iteration: int | None = None
    note: str = ""
    time: float | None = None

    @classmethod
    def from_json(cls, data: dict) -> "ExportRecord":
        student = data.get("student")
        return cls(
            student=student if isinstance(student, str) else None,
            path=data.get("path"),
            size=data.get("size"),
            mtime_ns=data.get("mtime_ns"),
            iteration=data.get("iteration"),
            note=data.get("note", ""),
            time=_number(data.get("time")),
        )

    def names(self, target: str) -> bool:
        """Whether ``target`` is still the very file this record made (same path, size and modification time)."""
        try:
            st = os.stat(target)
        except OSError:
            return False
        return self.path == target and self.size == st.st_size and self.mtime_ns == st.st_mtime_ns


def stale_temporaries(run_dir: str) -> list[str]:
    """Temporary checkpoint files a killed worker left (``.state.safetensors.*.tmp``, gigabytes on real models).
    Only the lock holder writes those, so the worker that opens the folder removes them."""
    prefixes = tuple(f".{name}." for name in (STATE, STUDENT))
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    return [
        os.path.join(run_dir, n)
        for n in names
        if n.startswith(prefixes)
        and n.endswith(".tmp")
        and os.path.isfile(os.path.join(run_dir, n))
        and not os.path.islink(os.path.join(run_dir, n))
    ]


def safetensors_entries(path: str, limit: int = 64 << 20) -> tuple[dict, dict]:
    """A safetensors file's JSON header: {tensor name: {"dtype", "shape", ...}} and its metadata (no tensor is
    loaded, nothing is unpickled). Raises ValueError for anything that is not safetensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("too short")
            size = struct.unpack("<Q", head)[0]
            if size <= 1 or size > limit:
                raise ValueError(f"header size {size}")
            header = json.loads(f.read(size))
    except OSError as err:
        raise ValueError(f"{os.path.basename(path)} cannot be read ({err.strerror})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{os.path.basename(path)} is not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{os.path.basename(path)} is not a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    return {k: v for k, v in header.items() if isinstance(v, dict)}, dict(meta)


def safetensors_header(path: str, limit: int = 64 << 20) -> tuple[list[str], dict]:
    """Tensor names and metadata of a safetensors file, from its header only (``safetensors_entries``)."""
    entries, meta = safetensors_entries(path, limit)
    return list(entries), meta


class RunFolderBusy(RuntimeError):
    pass


class RunLock:
    """An exclusive, non-blocking OS lock on ``<run>/lock``. The OS drops it when the holder exits in any way,
    so a lock that is free means no worker is alive in that folder."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.handle: IO | None = None

    def acquire(self) -> "RunLock":
        handle = open(self.path, "a+")
        try:
            _lock(handle)
        except OSError:
            handle.close()
            raise RunFolderBusy(f"the run folder {os.path.dirname(self.path)} is in use by another worker") from None
        self.handle = handle
        run_dir = os.path.dirname(self.path)
        for stale in stale_temporaries(run_dir):  # the folder is ours now: no other writer of these is alive
            os.unlink(stale)
        return self

    def release(self) -> None:
        if self.handle is not None:
            try:
                _unlock(self.handle)
            finally:
                self.handle.close()
                self.handle = None


def is_locked(run_dir: str) -> bool | None:
    """True while a worker holds the folder's lock, False when none does, None where file locks do not work
    (then watchers fall back to the heartbeat's age)."""
    path = os.path.join(run_dir, LOCK)
    if not os.path.exists(path):
        return False
    try:
        handle = open(path, "a+")
    except OSError:
        return None
    try:
        _lock(handle)
    except BlockingIOError:
        return True
    except OSError:  # e.g. a network file system without locks
        return None
    else:
        _unlock(handle)
        return False
    finally:
        handle.close()


try:  # POSIX
    import fcntl

    _HAS_LOCKS = True

    def _lock(handle):
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(handle):
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

except ImportError:  # Windows
    try:
        import msvcrt

        _HAS_LOCKS = True

        def _lock(handle):
            handle.seek(0)
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError as err:
                raise BlockingIOError(str(err)) from None

        def _unlock(handle):
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

    except ImportError:  # neither: rely on heartbeats
        _HAS_LOCKS = False

        def _lock(handle):
            raise OSError("no file locks on this system")

        def _unlock(handle):
            pass


# -- what a run was started with ---------------------------------------------------------------------------
def content_hash(path: str) -> str:
    """First 16 hex digits of the file's SHA-256, the same value as ``student.file_hash`` (the exact base weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# What a run trains on, beside its settings. Each is compared only where both sides recorded it: the ComfyUI
# submitter records the base file's size (hashing a 16 GB file would block its prompt) and leaves the hash to the
# worker, and runs started before an identity existed have none.
BASE_KEYS = ("name", "hash", "size", "prompts", "prompt_list", "text_encoder")
PROMPT_IDENTITIES = (
    ("prompt_list", "the prompt list changed"),
    ("text_encoder", "another text encoder (clip input) encodes them"),
)


def fingerprint(config: dict, base: dict) -> dict:
    """The parts of a run that shape its result: the base model (name, content hash or size), the prompts'
    identities (``BASE_KEYS``) and every setting but the resumable ones."""
    inactive = {"stage1": "stage2", "stage2": "stage1"}.get(
        str(config.get("stage"))
    )  # the other stage's settings do nothing
    return {
        "base": {k: base.get(k) for k in BASE_KEYS},
        "config": {k: v for k, v in config.items() if k not in RESUMABLE and k != inactive},
    }


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key in sorted(value):
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


class ResumeRefused(ValueError):
    """A run folder's checkpoint was made with another base model or other settings."""


def check_resume(run_dir: str, config: dict, base: dict, write: bool) -> None:
    """Refuse to continue a run whose base model or result-shaping settings changed, naming each change; record the
    fingerprint on first start. Used by every writer (the command line, torchrun, a thread, the ComfyUI worker)."""
    path = os.path.join(run_dir, FINGERPRINT)
    new = fingerprint(config, base)
    old = read_json(path)
    if old is None and os.path.exists(os.path.join(run_dir, STATE)):
        old = _fingerprint_from_state(os.path.join(run_dir, STATE), new)
    if old is not None:
        changes = fingerprint_changes(old, new)
        if changes:
            raise ResumeRefused(
                "resume refused: this run was started with a different configuration, so its checkpoint "
                "cannot continue with this one. Changed: "
                + "; ".join(changes)
                + ". Start a new run (another run name or folder) to train with the new configuration."
            )
    if write and not os.path.exists(path):
        write_json(path, new)


def _fingerprint_from_state(state_path: str, new: dict) -> dict | None:
    """A run started before fingerprints were written: its checkpoint's metadata records the config."""
    try:
        _, meta = safetensors_header(state_path)
        config = json.loads(meta["config"])
    except (ValueError, KeyError):
        return None
    return {
        "base": {"name": None, "hash": meta.get("base_hash", new["base"]["hash"])},
        "config": fingerprint(config, new["base"])["config"],
    }


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, one readable line per difference (empty: the same run)."""
    changes = _base_changes(old.get("base", {}), new.get("base", {}))
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    for key in sorted(set(a) | set(b)):
        if key == "teacher" or key == "prompts":  # the files' paths may move; their contents are compared above
            continue
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            changes.append(f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}")
    return changes


def _base_changes(ob: dict, nb: dict) -> list[str]:
    changes = []
    if ob.get("hash") and nb.get("hash"):
        if ob["hash"] != nb["hash"]:
            changes.append(f"base model: {ob.get('name')} (hash {ob['hash']}) -> {nb.get('name')} (hash {nb['hash']})")
    elif ob.get("size") is not None and nb.get("size") is not None and ob["size"] != nb["size"]:
        changes.append(f"base model: {ob.get('name')} ({ob['size']} bytes) -> {nb.get('name')} ({nb['size']} bytes)")
    for key, what in PROMPT_IDENTITIES:  # the submitter's: what it would encode, before anything is encoded
        if ob.get(key) and nb.get(key) and ob[key] != nb[key]:
            changes.append(f"prompts: {what} (hash {ob[key]} -> {nb[key]})")
    if ob.get("prompts") and nb.get("prompts") and ob["prompts"] != nb["prompts"]:  # the encoded file's
        changes.append(
            f"prompt set: hash {ob['prompts']} -> {nb['prompts']} (other prompts, or encoded by another text encoder)"
        )
    return changes


class OpenRun:
    """The one way a writer enters a run folder: the main process (rank 0) takes the folder's lock, and the run's
    fingerprint is checked once against the one recorded at its first start (``check_resume``). The worker opens
    the folder before it loads anything (a busy folder or a changed base refuses at once, before torchrun's process
    group); ``runtime.run_training`` opens it itself when nobody in this process has (the command line, a thread),
    and otherwise finds it open and checked.

        with OpenRun(run_dir, main) as run:   # RunFolderBusy
            run.check(config, base)            # ResumeRefused; later checks in this process do nothing
    """

    _open: ClassVar[dict[str, "OpenRun"]] = {}  # real path -> the folder this process has open

    def __init__(self, run_dir: str, main: bool = True):
        self.run_dir, self.main = run_dir, main
        self.lock = RunLock(run_dir) if main else None
        self.checked = False

    @classmethod
    def current(cls, run_dir: str) -> "OpenRun | None":
        return cls._open.get(os.path.realpath(run_dir))

    def open(self) -> "OpenRun":
        if self.lock is not None:
            self.lock.acquire()
        OpenRun._open[os.path.realpath(self.run_dir)] = self
        return self

    def close(self) -> None:
        OpenRun._open.pop(os.path.realpath(self.run_dir), None)
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "OpenRun":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, config: dict, base: dict) -> None:
        """Refuse a resume whose base model or result-shaping settings changed; the main process records the
        fingerprint on first start. Once per open folder."""
        if not self.checked:
            check_resume(self.run_dir, config, base, write=self.main)
            self.checked = True


# -- reading a run ------------------------------------------------------------------------------------------
class Pace:
    """A run's iterations per second and time left, from the iterations' own pace: the clock starts when this run's
    first iteration has completed (a fresh start or a resume), so start-up (model load, warm-up, the first
    iteration's allocations) is not counted and a resumed run counts from the iteration it resumed at."""

    def __init__(self, total: int):
        self.total = total
        self.since: tuple[int, float] | None = None  # (iteration, time) of this run's first completed iteration

    def add(self, iteration: int, now: float) -> tuple[float | None, float | None]:
        """(it_per_s, eta_s) after ``iteration`` completed at ``now``; unknown (None) until two have."""
        if self.since is None:
            self.since = (iteration, now)
            return None, None
        done, seconds = iteration - self.since[0], now - self.since[1]
        if done <= 0 or seconds <= 0:
            return None, None
        speed = done / seconds
        return speed, max(0, self.total - iteration) / speed


def current_pace(record: dict, beat: "Beat | None") -> tuple[float | None, float | None]:
    """(it_per_s, eta_s) of the live run from its last metrics record: unknown when the record was written before
    the running worker started (a resumed run that has not finished two iterations yet shows no figure from the
    run before) or carries none."""
    written = _number(record.get("time"))
    if beat is None or beat.started is None or written is None or written < beat.started:
        return None, None
    speed, eta = _number(record.get("it_per_s")), _number(record.get("eta_s"))
    if speed is None or eta is None or not (speed > 0 and math.isfinite(speed) and math.isfinite(eta) and eta >= 0):
        return None, None
    return speed, eta


def checkpoint_iteration(run_dir: str) -> int | None:
    """The iteration the run's checkpoint holds (what a resume continues from), from its header; None without one."""
    try:
        _, meta = safetensors_header(os.path.join(run_dir, STATE))
        return count(int(meta["iteration"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def heartbeat_age(run_dir: str, now: float | None = None) -> float | None:
    beat = Beat.read(run_dir)
    if beat is None or beat.time is None:
        return None
    return (now or time.time()) - beat.time


def read_metrics(path: str, offset: int = 0) -> tuple[list[dict], int]:
    """The complete JSON lines after byte ``offset`` and the offset to read from next time (a line the writer
    is still writing is left for the next call)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(METRICS_CHUNK)
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    if end == 0 and len(data) == METRICS_CHUNK:  # one line longer than a chunk: damaged, skipped
        return [], offset + len(data)
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration", 0), int):
            records.append(record)
    return records, offset + end


def tail(path: str, lines: int = 30, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a text file (e.g. a crashed worker's log), '' when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns; keep only the last state of each line
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in data.splitlines())
    return "\n".join(text.splitlines()[-lines:])


PREVIEW_LIMIT = 32 << 20  # bytes: a preview grid is a few hundred kB


def latest_preview(run_dir: str) -> str | None:
    """The preview of the highest iteration: a regular file named ``<iteration>.png`` directly in the previews
    folder (numbers compared as numbers: 100000.png comes after 99999.png). Links and anything else placed
    there are ignored, so no other file of the machine can be served as a preview."""
    folder = os.path.join(run_dir, PREVIEWS)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    found = [
        (int(e.name[:-4]), e.path)
        for e in entries
        if e.name.endswith(".png") and e.name[:-4].isdigit() and e.is_file(follow_symlinks=False)
    ]
    return max(found)[1] if found else None


def read_preview(path: str) -> bytes:
    """A preview's bytes, refusing a link swapped in after ``latest_preview`` looked (O_NOFOLLOW) and any file
    larger than PREVIEW_LIMIT."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(PREVIEW_LIMIT + 1)
    if len(data) > PREVIEW_LIMIT:
        raise ValueError(f"preview {path} is larger than {PREVIEW_LIMIT >> 20} MiB")
    return data
