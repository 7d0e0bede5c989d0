"""Background distillation jobs inside ComfyUI: one registry, worker processes, REST routes and websocket events.

Each job is a run folder ``<ComfyUI user dir>/xslim/distill/<run name>`` (protocol: ``distill_core/jobfiles.py``)
and a worker process started with ComfyUI's own Python in a new process group, so the queue stays free, a
crash of the worker cannot take ComfyUI down, and the worker outlives a ComfyUI restart (the next ComfyUI
finds it running by its folder lock). A monitor thread tails the folders and pushes the pack's own
``xslim.job`` websocket event; it never touches ComfyUI's ProgressBar or interrupt flag, which belong to the
prompt being executed. Routes (also under /api):

    GET  /xslim/jobs                     every job (summaries), and whether ComfyUI has its own jobs API
    GET  /xslim/jobs/{name}              one job: summary, loss history, log tail
    POST /xslim/jobs/{name}/cancel       save and stop (repeating it changes nothing); {"force": true} terminates it
    POST /xslim/jobs/{name}/resume       continue a stopped, interrupted or failed job from its checkpoint
    GET  /xslim/jobs/{name}/loss.png     the loss curves
    GET  /xslim/jobs/{name}/preview.png  the latest preview grid

Errors come back as JSON ``{"error": message}`` with 400 (bad input), 404 (no such job) or 409 (wrong state).
"""

from __future__ import annotations

import io as _io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from distill_core import jobfiles as jf
from xslim_core.files import fresh_temporary

log = logging.getLogger("xslim")
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
EVENT = "xslim.job"
CANCEL_GRACE_S = 60.0  # a stop request waits this long for the worker to save and exit before escalating
TERMINATE_GRACE_S = 10.0  # after SIGTERM, this long before SIGKILL
POLL_S = 1.0
HISTORY_CAP = 4000  # loss points kept per job in memory (halved by decimation when reached)
ACTIVE = ("starting", "running", "stopping")
RESUMABLE_STATES = ("stopped", "interrupted", "failed")
# The worker's entry script (it finds its packages even where PYTHONPATH is ignored: embedded Pythons)
WORKER_SCRIPT = os.path.join(PACK_ROOT, "xslim_worker.py")


class JobError(Exception):
    """A refusal with an HTTP status: 400 bad input, 404 unknown job, 409 not possible in the job's state."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_run_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise JobError(f"run name {name!r} is not allowed: use {NAME_RULE} (a name, not a path)")
    return name


def jobs_root() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_user_directory(), "xslim", "distill")


def students_dir() -> str:
    """Where finished students are exported: the first (default) folder of the ``students`` model folder."""
    import folder_paths

    if "students" not in folder_paths.folder_names_and_paths:  # normally registered by the student nodes
        folder_paths.folder_names_and_paths["students"] = ([os.path.join(folder_paths.models_dir, "students")], {".safetensors"})
    return folder_paths.get_folder_paths("students")[0]


def parse_devices(device: str) -> list[str] | None:
    """'cpu' -> None; 'cuda', 'cuda:0' or 'cuda:0,1' -> the CUDA device ids (['0'], ['0', '1'])."""
    device = (device or "cpu").strip().lower()
    if device == "cpu":
        return None
    m = re.fullmatch(r"cuda(?::(\d+(?:\s*,\s*\d+)*))?", device)
    if not m:
        raise JobError(f"device {device!r} is not understood: use 'cpu', 'cuda', 'cuda:0' or several GPUs as 'cuda:0,1'")
    return [d.strip() for d in m.group(1).split(",")] if m.group(1) else ["0"]


def comfy_jobs_api() -> bool:
    """Whether this ComfyUI has its own jobs API (``/api/jobs``, module ``comfy_execution.jobs``). It lists the
    prompts of its queue and history only and offers extensions no way to add outside jobs, so a training job
    shows there as the *1.x-Distill Job Status* prompt that waits for it. ``GET /xslim/jobs`` reports it."""
    import importlib.util

    try:
        return importlib.util.find_spec("comfy_execution.jobs") is not None
    except (ImportError, ValueError):  # no comfy_execution package at all (not inside ComfyUI)
        return False


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _count(value) -> int | None:
    """A non-negative whole number from a run file, else None (a damaged file says nothing)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Job:
    def __init__(self, name: str, run_dir: str):
        self.name, self.run_dir = name, run_dir
        self.proc: subprocess.Popen | None = None
        self.offset, self.history, self.last = 0, [], {}
        self.cancel_at = self.term_at = None
        self.sent = None
        self.damage: str | None = None  # why the run folder could not be read, once said

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)


class JobManager:
    def __init__(self, root: str | None = None, notify=None):
        self._root, self.notify = root, notify
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self._monitor: threading.Thread | None = None
        self._quit = threading.Event()

    # -- where --------------------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return self._root or jobs_root()

    def run_dir(self, name: str) -> str:
        path = os.path.abspath(os.path.join(self.root, check_run_name(name)))
        if os.path.dirname(path) != os.path.abspath(self.root):  # belt and braces: a name never leaves the root
            raise JobError(f"run name {name!r} resolves outside the jobs folder")
        return path

    def job(self, name: str, must_exist: bool = True) -> Job:
        with self.lock:
            run_dir = self.run_dir(name)
            if name not in self.jobs:
                if must_exist and not os.path.isfile(os.path.join(run_dir, jf.JOB)):
                    raise JobError(f"no job named {name!r} (jobs live in {self.root})", 404)
                self.jobs[name] = Job(name, run_dir)
            return self.jobs[name]

    def scan(self) -> list[Job]:
        """Every run folder with a job.json, including those of earlier ComfyUI sessions."""
        with self.lock:
            try:
                names = sorted(os.listdir(self.root))
            except OSError:
                names = []
            for name in names:
                if name not in self.jobs and NAME_PATTERN.fullmatch(name) and os.path.isfile(os.path.join(self.root, name, jf.JOB)):
                    self.jobs[name] = Job(name, os.path.join(self.root, name))
            return [self.jobs[n] for n in sorted(self.jobs)]

    # -- state --------------------------------------------------------------------------------------------
    def _alive(self, job: Job) -> bool:
        if job.proc is not None and job.proc.poll() is None:
            return True
        locked = jf.is_locked(job.run_dir)
        if locked is None:  # no file locks here: trust a fresh heartbeat
            age = jf.heartbeat_age(job.run_dir)
            return age is not None and age < jf.STALE_AFTER_S and not os.path.exists(job.path(jf.STATUS))
        return locked

    def state(self, job: Job) -> str:
        if self._alive(job):
            if job.cancel_at is not None or os.path.exists(job.path(jf.STOP)):
                return "stopping"
            beat = jf.read_json(job.path(jf.HEARTBEAT)) or {}
            return "starting" if beat.get("phase", "loading") == "loading" else "running"
        status = jf.read_json(job.path(jf.STATUS))
        if status and status.get("state") in jf.FINAL_STATES:
            return status["state"]
        if job.proc is not None:  # our worker ended without its last word: it crashed or was killed
            return self._record_crash(job)
        return "interrupted"  # a worker of an earlier ComfyUI session stopped without a clean exit

    def _record_crash(self, job: Job) -> str:
        code = job.proc.returncode
        how = f"was killed by signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0 else f"exited with code {code}"
        log_tail = jf.tail(job.path(jf.LOG))
        asked = job.cancel_at is not None  # the user asked it to stop: stopped, only without its final save
        message = (f"{'stopped as asked, but ' if asked else ''}the worker process {how} without a final status; the "
                   f"last checkpoint is kept and the job can be resumed. Last lines of its log ({job.path(jf.LOG)}):\n{log_tail}")
        if jf.is_locked(job.run_dir) is not True:  # never write into a folder a live worker owns
            jf.write_json(job.path(jf.STATUS), {"state": "stopped" if asked else "failed", "iteration": job.last.get("iteration"),
                                                "message": message, "student": None, "crashed": True, "exit_code": code,
                                                "time": time.time()})
        log.warning("1.x-Distill job %s: %s", job.name, message.splitlines()[0])
        job.proc = None
        return "stopped" if asked else "failed"

    def _read_new_metrics(self, job: Job) -> None:
        records, job.offset = jf.read_metrics(job.path(jf.METRICS), job.offset)
        for r in records:
            while job.history and job.history[-1]["iteration"] >= r.get("iteration", 0):  # redone after a resume
                job.history.pop()
            job.last = r
            job.history.append({k: v for k, v in r.items() if k == "iteration" or k.startswith("loss")})
        if len(job.history) > HISTORY_CAP:
            job.history = job.history[::2]

    def summary(self, job: Job) -> dict:
        with self.lock:
            self._read_new_metrics(job)
            state = self.state(job)
            spec = jf.read_json(job.path(jf.JOB)) or {}
            config, base = _mapping(spec.get("config")), _mapping(spec.get("base"))
            status = jf.read_json(job.path(jf.STATUS)) or {}
            if state == "done":  # whoever sees it done first exports (once), so "done" always comes with its student
                self.export(job)
            export = jf.read_json(job.path("export.json")) or {}
            beat = jf.read_json(job.path(jf.HEARTBEAT)) or {}
            total = _count(config.get("iterations"))
            iteration = _count(job.last.get("iteration", beat.get("iteration"))) or 0
            preview = jf.latest_preview(job.run_dir)
            return {
                "name": job.name, "state": state, "model": base.get("name"), "family": base.get("family"),
                "iteration": iteration, "iterations": total, "progress": min(1.0, iteration / total) if total else 0.0,
                "it_per_s": job.last.get("it_per_s") if state in ACTIVE else None,
                "eta_s": job.last.get("eta_s") if state in ACTIVE else None,
                "losses": {k: v for k, v in job.last.items() if k.startswith("loss")},
                "preview": int(os.path.basename(preview)[:-4]) if preview else None,
                # the student of this run as it stands: an earlier export of a run trained on is not its result
                "student": export.get("student") if state == "done" else None,
                "message": self._message(state, status, iteration),
                "can_cancel": state in ACTIVE, "can_resume": state in RESUMABLE_STATES,
                "heartbeat_age_s": jf.heartbeat_age(job.run_dir), "created": spec.get("created"),
            }

    def safe_summary(self, job: Job) -> dict:
        """``summary``, or, for a run folder whose files cannot be made sense of, that job alone as "damaged"
        with the reason: one bad folder never hides the other jobs."""
        try:
            summary = self.summary(job)
            job.damage = None
            return summary
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            if job.damage != reason:  # said once per cause, not at every look
                job.damage = reason
                log.warning("1.x-Distill job %s: its run folder %s cannot be read (%s)", job.name, job.run_dir, reason)
            return {"name": job.name, "state": "damaged", "model": None, "family": None, "iteration": 0, "iterations": None,
                    "progress": 0.0, "it_per_s": None, "eta_s": None, "losses": {}, "preview": None, "student": None,
                    "message": f"this job's run folder cannot be read ({reason}); the other jobs are not affected. "
                               f"Look at the files in {job.run_dir}, or remove the folder.",
                    "can_cancel": False, "can_resume": False, "heartbeat_age_s": None, "created": None}

    @staticmethod
    def _message(state: str, status: dict, iteration) -> str:
        if state == "interrupted":
            return ("the worker stopped without a clean exit (ComfyUI or the machine was restarted, or the worker was killed); "
                    "Resume continues from the last checkpoint")
        return "" if state in ACTIVE else status.get("message", "")

    def detail(self, job: Job) -> dict:
        with self.lock:
            out = self.safe_summary(job)
            spec = jf.read_json(job.path(jf.JOB)) or {}
            out.update(history=job.history[-1000:], config=spec.get("config"), gpu=spec.get("gpu"),
                       log_tail=jf.tail(job.path(jf.LOG), 20))
            return out

    def list(self) -> list[dict]:
        return [self.safe_summary(job) for job in self.scan()]

    # -- actions ------------------------------------------------------------------------------------------
    def submit(self, name: str, base: dict, config: dict, gpu: dict, overwrite_student: bool = False,
               write_extra=None, bootstrap: dict | None = None, before_start=None) -> tuple[dict, str]:
        """Start a new job, or continue the run of that name when only resumable settings differ.
        Returns (summary, what happened). ``write_extra(run_dir)`` writes e.g. conditioning.safetensors;
        ``bootstrap`` tells the worker what to make importable first (``distill_core.worker.bootstrap``);
        ``before_start()`` runs just before a worker starts, after ``write_extra`` (e.g. ComfyUI unloading its
        models, the CLIP that encoded the prompts included), and never when nothing starts.

        Nothing here reads the base model file: a change of its size is refused at once, a change of its contents
        by the worker, which hashes the file and fails the job naming the change (a 16 GB file would otherwise
        hold the prompt for tens of seconds)."""
        with self.lock:
            run_dir = self.run_dir(name)
            devices = parse_devices(gpu.get("device", "cpu"))
            job = self.job(name, must_exist=False)
            old = jf.read_json(job.path(jf.JOB))
            spec = {"format": "xslim-distill-job/1", "config": config, "base": base, "gpu": gpu,
                    "export": {"overwrite": bool(overwrite_student)}, "created": time.time(),
                    **({"bootstrap": bootstrap} if bootstrap else {})}
            if old is None:
                self._check_export_target(name, overwrite_student, None)
                os.makedirs(run_dir, exist_ok=True)
                if write_extra is not None:
                    write_extra(run_dir)
                jf.write_json(job.path(jf.JOB), spec)
                if before_start is not None:
                    before_start()
                self._spawn(job, devices)
                return self.summary(job), "started"
            state = self.state(job)
            if state in ACTIVE:
                raise JobError(f"run name {name!r} is used by a running job (iteration {job.last.get('iteration', 0)} of "
                               f"{(old.get('config') or {}).get('iterations')}); cancel it in the jobs panel, or choose "
                               "another run name", 409)
            changes = jf.fingerprint_changes(jf.fingerprint(old.get("config") or {}, old.get("base") or {}),
                                             jf.fingerprint(config, base))
            if changes:
                raise JobError(f"run {name!r} was started with a different configuration, and a resume must not change it. "
                               f"Changed: {'; '.join(changes)}. Choose a new run name to train with these settings.", 409)
            done_at = (jf.read_json(job.path(jf.STATUS)) or {}).get("iteration") or 0
            finished = state == "done" and done_at >= config.get("iterations", 0)
            if finished:
                return self.summary(job), "finished earlier; nothing to train"
            self._check_export_target(name, overwrite_student, job)
            jf.write_json(job.path(jf.JOB), {**spec, "created": old.get("created", spec["created"])})
            if before_start is not None:
                before_start()
            self._restart(job, devices)
            return self.summary(job), "resumed"

    def resume(self, name: str) -> dict:
        with self.lock:
            job = self.job(name)
            state = self.state(job)
            if state not in RESUMABLE_STATES:
                hint = ("it is still running" if state in ACTIVE else
                        "it finished; to train longer, queue the Train node again with more iterations")
                raise JobError(f"job {name!r} cannot be resumed: {hint} (state {state})", 409)
            spec = jf.read_json(job.path(jf.JOB)) or {}
            model = (spec.get("config") or {}).get("teacher")
            recorded = (spec.get("base") or {}).get("size")
            if not model or not os.path.isfile(model):
                raise JobError(f"job {name!r} cannot be resumed: its base model file {model!r} is gone", 409)
            size = os.path.getsize(model)
            if recorded is not None and size != recorded:  # other contents: the worker's hash decides
                raise JobError(f"job {name!r} cannot be resumed: its base model {spec['base'].get('name')} changed on disk "
                               f"({recorded} bytes when the job started, {size} now); the checkpoint "
                               "belongs to the old weights. Start a new run for the new weights.", 409)
            self._restart(job, parse_devices((spec.get("gpu") or {}).get("device", "cpu")))
            return self.summary(job)

    def cancel(self, name: str, force: bool = False) -> dict:
        with self.lock:
            job = self.job(name)
            state = self.state(job)
            if state not in ACTIVE:
                raise JobError(f"job {name!r} is not running (state {state}); nothing to cancel", 409)
            if force:  # stop without waiting for the clean save
                self._terminate(job, signal.SIGTERM)
            elif job.cancel_at is None:
                with open(job.path(jf.STOP), "w") as f:
                    f.write("stop requested by the jobs panel / route\n")
                job.cancel_at = time.time()
            # a repeated plain cancel (a double click, two tabs) is the same request: it never escalates
            return self.summary(job)

    def _check_export_target(self, name: str, overwrite: bool, job: Job | None) -> None:
        target = os.path.join(students_dir(), f"{name}.safetensors")
        if os.path.exists(target) and not overwrite and not (job and self._is_own_export(job, target)):
            raise JobError(f"a student named {name}.safetensors already exists in {os.path.dirname(target)}; choose "
                           "another run name, or turn on overwrite_student to replace it when this job finishes", 409)

    @staticmethod
    def _is_own_export(job: Job, target: str) -> bool:
        export = jf.read_json(job.path("export.json")) or {}
        try:
            st = os.stat(target)
        except OSError:
            return False
        return export.get("path") == target and export.get("size") == st.st_size and export.get("mtime_ns") == st.st_mtime_ns

    def _restart(self, job: Job, devices) -> None:
        # export.json stays: it names the file this run exported before, which the next export replaces in place
        for stale in (jf.STOP, jf.STATUS, jf.HEARTBEAT):
            if os.path.exists(job.path(stale)):
                os.remove(job.path(stale))
        self._spawn(job, devices)

    def _spawn(self, job: Job, devices: list[str] | None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in (PACK_ROOT, os.environ.get("PYTHONPATH")) if p)}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices) if devices else ""  # 'cpu' keeps the worker off every GPU
        if devices and len(devices) > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(len(devices)),
                   WORKER_SCRIPT, "--run-dir", job.run_dir]
        else:
            cmd = [sys.executable, WORKER_SCRIPT, "--run-dir", job.run_dir]
        group = {"start_new_session": True} if os.name == "posix" else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        with open(job.path(jf.LOG), "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd[:3])} ...\n".encode())
            out.flush()
            job.proc = subprocess.Popen(cmd, cwd=PACK_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, close_fds=True, **group)
        job.cancel_at = job.term_at = None
        job.offset, job.history, job.last = 0, [], {}
        self.start_monitor()

    def _worker_group(self, job: Job) -> int | None:
        if job.proc is not None and job.proc.poll() is None:
            return job.proc.pid  # a session leader: its group id is its pid
        beat = jf.read_json(job.path(jf.HEARTBEAT)) or {}  # a worker started by an earlier ComfyUI session
        return beat.get("pgid") or beat.get("pid")

    def _terminate(self, job: Job, sig) -> None:
        group = self._worker_group(job)
        if not group:
            return
        try:
            if os.name == "posix":
                if os.getpgid(group) != group:  # the id was reused by an unrelated process: leave it alone
                    return
                os.killpg(group, sig)
            elif job.proc is not None:
                job.proc.kill() if sig == getattr(signal, "SIGKILL", None) else job.proc.terminate()
        except (ProcessLookupError, PermissionError):
            return
        job.term_at = job.term_at or time.time()
        if job.cancel_at is None:
            job.cancel_at = job.term_at

    # -- the monitor thread -------------------------------------------------------------------------------
    def start_monitor(self) -> None:
        with self.lock:
            if self._monitor is None or not self._monitor.is_alive():
                self._monitor = threading.Thread(target=self._run_monitor, name="xslim-jobs-monitor", daemon=True)
                self._monitor.start()

    def stop_monitor(self) -> None:
        self._quit.set()

    def _run_monitor(self) -> None:
        last_scan = 0.0
        while not self._quit.wait(POLL_S):
            try:
                if time.time() - last_scan > 5:
                    self.scan()
                    last_scan = time.time()
                for job in list(self.jobs.values()):
                    self._tick(job)
            except Exception:  # the monitor must survive anything a run folder throws at it
                log.exception("1.x-Distill jobs monitor")

    def _tick(self, job: Job) -> None:
        with self.lock:
            summary = self.safe_summary(job)
            state = summary["state"]
            now = time.time()
            if state == "stopping" and job.cancel_at is not None:
                if job.term_at is None and now - job.cancel_at > CANCEL_GRACE_S:
                    log.warning("1.x-Distill job %s did not stop within %.0f s; terminating it", job.name, CANCEL_GRACE_S)
                    self._terminate(job, signal.SIGTERM)
                elif job.term_at is not None and now - job.term_at > TERMINATE_GRACE_S:
                    self._terminate(job, getattr(signal, "SIGKILL", signal.SIGTERM))
            if state not in ACTIVE:
                job.cancel_at = job.term_at = None
            key = (state, summary["iteration"], summary["preview"], summary["student"])
            if key != job.sent:
                job.sent = key
                if self.notify is not None:
                    self.notify(summary)

    # -- finished students --------------------------------------------------------------------------------
    def export(self, job: Job) -> str | None:
        """Copy the finished student into the students model folder; never replaces a file the user did not
        ask to replace (then it takes the next free name and says so)."""
        with self.lock:
            done = jf.read_json(job.path("export.json"))
            finished_at = (jf.read_json(job.path(jf.STATUS)) or {}).get("iteration")
            if done and done.get("iteration") == finished_at:
                return done.get("student")
            return self._export(job, finished_at)

    def _export(self, job: Job, iteration) -> str | None:
        source = job.path(jf.STUDENT)
        if not os.path.isfile(source):
            return None
        spec = jf.read_json(job.path(jf.JOB)) or {}
        overwrite = bool((spec.get("export") or {}).get("overwrite"))
        folder = students_dir()
        os.makedirs(folder, exist_ok=True)
        # a fresh, exclusively created temporary name: a planted file or link in the models folder is never written through
        with fresh_temporary(folder, job.name) as tmp:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o644)
            target, n = os.path.join(folder, f"{job.name}.safetensors"), 1
            while True:
                if overwrite or self._is_own_export(job, target):
                    os.replace(tmp, target)
                    break
                try:
                    os.link(tmp, target)  # atomic "create only if absent"
                    break
                except FileExistsError:
                    n += 1
                    target = os.path.join(folder, f"{job.name}_{n}.safetensors")
                except OSError:  # no hard links on this file system
                    if not os.path.exists(target):
                        os.replace(tmp, target)
                        break
                    n += 1
                    target = os.path.join(folder, f"{job.name}_{n}.safetensors")
        st = os.stat(target)
        note = "" if n == 1 else f"{job.name}.safetensors appeared meanwhile and was kept; exported as {os.path.basename(target)}"
        jf.write_json(job.path("export.json"), {"student": os.path.basename(target), "path": target, "size": st.st_size,
                                                "mtime_ns": st.st_mtime_ns, "iteration": iteration,
                                                "note": note, "time": time.time()})
        log.info("1.x-Distill job %s: student exported to %s", job.name, target)
        return os.path.basename(target)


_manager: JobManager | None = None


def manager() -> JobManager:
    global _manager
    if _manager is None:
        _manager = JobManager(notify=_push_event)
    return _manager


def _push_event(summary: dict) -> None:
    try:
        import server

        instance = getattr(server.PromptServer, "instance", None)
        if instance is not None:
            instance.send_sync(EVENT, summary)  # thread-safe: hands the message to the server's event loop
    except Exception:
        log.debug("could not push a jobs event", exc_info=True)


# -- REST routes -------------------------------------------------------------------------------------------
_registered = False


def register_routes() -> bool:
    """Add the /xslim/jobs routes to ComfyUI's server (feature-detected: no server, no routes) and start the
    monitor, which also re-attaches to jobs of earlier sessions. Safe to call more than once."""
    global _registered
    if _registered:
        return True
    try:
        import server
        from aiohttp import web
    except ImportError:
        return False
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(instance, "routes", None)
    if routes is None:
        return False
    jobs = manager()

    def reply(data, status: int = 200):  # one serializer for every route: never NaN, never a bare exception
        return web.json_response(data, status=status, dumps=jf.dumps)

    def error(status: int, message: str):
        return reply({"error": message}, status)

    def guarded(handler):
        async def wrapped(request):
            try:
                return await handler(request)
            except JobError as err:
                return error(err.status, str(err))
            except Exception as err:  # a route must answer JSON, whatever went wrong
                log.exception("1.x-Distill jobs route %s", request.path)
                return error(500, f"{type(err).__name__}: {err}")
        return wrapped

    async def run_blocking(fn, *args):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @routes.get("/xslim/jobs")
    @guarded
    async def list_jobs(request):
        return reply({"jobs": await run_blocking(jobs.list), "root": jobs.root, "comfy_jobs_api": comfy_jobs_api()})

    @routes.get("/xslim/jobs/{name}")
    @guarded
    async def get_job(request):
        return reply(await run_blocking(lambda: jobs.detail(jobs.job(request.match_info["name"]))))

    async def body(request) -> dict:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except Exception:
            raise JobError("the request body is not JSON; send {} or {\"force\": true}") from None
        if not isinstance(data, dict):
            raise JobError("the request body must be a JSON object")
        return data

    @routes.post("/xslim/jobs/{name}/cancel")
    @guarded
    async def cancel_job(request):
        force = (await body(request)).get("force", False)
        if not isinstance(force, bool):
            raise JobError("'force' must be true or false")
        return reply(await run_blocking(jobs.cancel, request.match_info["name"], force))

    @routes.post("/xslim/jobs/{name}/resume")
    @guarded
    async def resume_job(request):
        await body(request)
        return reply(await run_blocking(jobs.resume, request.match_info["name"]))

    @routes.get("/xslim/jobs/{name}/loss.png")
    @guarded
    async def loss_png(request):
        def render():
            from .job_pictures import loss_plot

            job = jobs.job(request.match_info["name"])
            s = jobs.summary(job)
            buf = _io.BytesIO()
            loss_plot(job.history, f"{job.name}: {s['state']}, iteration {s['iteration']} of {s['iterations']}").save(buf, "PNG")
            return buf.getvalue()

        return web.Response(body=await run_blocking(render), content_type="image/png", headers={"Cache-Control": "no-store"})

    @routes.get("/xslim/jobs/{name}/preview.png")
    @guarded
    async def preview_png(request):
        job = jobs.job(request.match_info["name"])
        path = jf.latest_preview(job.run_dir)
        if path is None:
            raise JobError(f"job {job.name!r} has no preview yet (one is written every preview_every iterations)", 404)
        try:
            data = await run_blocking(jf.read_preview, path)
        except (OSError, ValueError) as err:  # swapped for a link after the look, or far too large
            raise JobError(f"job {job.name!r}: its latest preview cannot be served ({err})", 404) from None
        return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "no-store"})

    _registered = True
    jobs.start_monitor()
    return True


__all__ = ["JobError", "JobManager", "check_run_name", "comfy_jobs_api", "manager", "parse_devices", "register_routes",
           "students_dir"]
