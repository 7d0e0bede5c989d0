"""Background distillation jobs inside ComfyUI: the job manager (submit, resume, cancel, the monitor thread) and
websocket events.

Each job is a run folder ``<ComfyUI user dir>/xslim/distill/<run name>`` (protocol: ``distill_core/jobfiles.py``).
The manager is built from separate parts: reading jobs (``job_store.py``, read-only), starting and stopping their
workers (``job_launcher.py``), exporting finished students (``job_export.py``) and the REST routes
(``job_routes.py``). A monitor thread settles the jobs (a crashed worker's end recorded, a finished student
exported) and pushes the pack's own ``xslim.job`` websocket event; it never touches ComfyUI's ProgressBar or
interrupt flag, which belong to the prompt being executed.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

from distill_core import jobfiles as jf
from .job_export import StudentExporter
from .job_launcher import PACK_ROOT, WORKER_SCRIPT, JobLauncher
from .job_routes import register_routes
from .job_store import (ACTIVE, HISTORY_CAP, NAME_PATTERN, NAME_RULE, RESUMABLE_STATES, Job, JobError, JobStore,
                        check_run_name, jobs_root)

log = logging.getLogger("xslim")
EVENT = "xslim.job"
CANCEL_GRACE_S = 60.0  # a stop request waits this long for the worker to save and exit before escalating
TERMINATE_GRACE_S = 10.0  # after SIGTERM, this long before SIGKILL
POLL_S = 1.0


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


class JobManager(JobStore):
    """The jobs of this ComfyUI: what the store reads, plus the actions (submit, resume, cancel, export) and the
    monitor thread. ``notify(summary)`` receives each changed summary (the websocket event)."""

    def __init__(self, root: str | None = None, notify=None):
        super().__init__(root)
        self.notify = notify
        self.launcher = JobLauncher()
        self.exporter = StudentExporter(lambda: students_dir())  # looked up at each export (tests replace it)
        self._monitor: threading.Thread | None = None
        self._quit = threading.Event()

    # -- what the routes and the monitor show -------------------------------------------------------------
    def settle(self, job: Job) -> None:
        """Bring the job's folder up to date with what happened: a worker of ours that ended without its last
        word gets it (failed, or stopped when asked), and a finished student is exported, so "done" always comes
        with its student. The only writes a look at a job leads to; the monitor does them every second."""
        with self.lock:
            self._read_new_metrics(job)
            self.launcher.reap(job)
            if self.state(job) == jf.JobState.DONE.value:
                self.exporter.export(job)

    def present(self, job: Job) -> dict:
        """The job settled (``settle``), then its summary; a folder that cannot be handled shows as damaged."""
        def settled(job):
            self.settle(job)
            return self.summary(job)

        return self._guarded(job, settled)

    def overview(self) -> list[dict]:
        """Every job, settled: what ``GET /xslim/jobs`` sends."""
        return [self.present(job) for job in self.scan()]

    def settled_detail(self, name: str) -> dict:
        """One job, settled, with its history, settings and log tail: what ``GET /xslim/jobs/{name}`` sends."""
        with self.lock:
            job = self.job(name)
            return self.detail(job, self.present(job))

    # -- actions ------------------------------------------------------------------------------------------
    def submit(self, name: str, base: dict, config, gpu: dict, overwrite_student: bool = False,
               write_extra=None, bootstrap: dict | None = None, before_start=None) -> tuple[dict, str]:
        """Start a new job, or continue the run of that name when only resumable settings differ.
        ``config``: the run's settings as ``distill_core.config.RunRequest`` (a dict is checked into one).
        Returns (summary, what happened). ``write_extra(run_dir)`` writes e.g. conditioning.safetensors;
        ``bootstrap`` tells the worker what to make importable first (``distill_core.worker.bootstrap``);
        ``before_start()`` runs just before a worker starts, after ``write_extra`` (e.g. ComfyUI unloading its
        models, the CLIP that encoded the prompts included), and never when nothing starts.

        Nothing here reads the base model file: a change of its size is refused at once, a change of its contents
        by the worker, which hashes the file and fails the job naming the change (a 16 GB file would otherwise
        hold the prompt for tens of seconds)."""
        from distill_core.config import RunRequest

        if not isinstance(config, RunRequest):
            try:
                config = RunRequest(config)
            except (ValueError, TypeError) as err:
                raise JobError(f"job {name!r}: {err}") from None
        config = config.to_json()
        with self.lock:
            run_dir = self.run_dir(name)
            devices = parse_devices(gpu.get("device", "cpu"))
            job = self.job(name, must_exist=False)
            old = jf.JobSpec.read(run_dir)
            spec = jf.JobSpec(config=config, base=base, gpu=gpu, export={"overwrite": bool(overwrite_student)},
                              created=time.time(), bootstrap=bootstrap)
            if old is None:
                self.exporter.check_target(name, overwrite_student, None)
                os.makedirs(run_dir, exist_ok=True)
                if write_extra is not None:
                    write_extra(run_dir)
                spec.write(run_dir)
                if before_start is not None:
                    before_start()
                self._spawn(job, devices)
                return self.summary(job), "started"
            state = self.state(job)
            # the worker checks the run's recorded fingerprint (with the base file's hash); this refuses at once
            # what job.json already shows, before anything is written or unloaded
            changes = jf.fingerprint_changes(jf.fingerprint(old.config, old.base), jf.fingerprint(config, base))
            if state in ACTIVE:
                if not changes and config.get("iterations") == old.config.get("iterations"):
                    # the same workflow queued again while its job trains (to sample once it is done): nothing to start
                    return self.summary(job), "already running"
                raise JobError(f"run name {name!r} is used by a running job (iteration {job.last.get('iteration', 0)} of "
                               f"{old.config.get('iterations')}) with other settings; cancel it in the jobs panel, or "
                               "choose another run name", 409)
            if changes:
                raise JobError(f"run {name!r} was started with a different configuration, and a resume must not change it. "
                               f"Changed: {'; '.join(changes)}. Choose a new run name to train with these settings.", 409)
            last = self.last_word(job)
            done_at = (last.iteration if last else None) or 0
            finished = state == jf.JobState.DONE.value and done_at >= config.get("iterations", 0)
            if finished:
                return self.summary(job), "finished earlier; nothing to train"
            self.exporter.check_target(name, overwrite_student, job)
            spec.created = old.created if old.created is not None else spec.created
            spec.write(run_dir)
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
            spec = jf.JobSpec.read(job.run_dir) or jf.JobSpec(config={}, base={})
            model = spec.config.get("teacher")
            recorded = spec.base.get("size")
            if not model or not os.path.isfile(model):
                raise JobError(f"job {name!r} cannot be resumed: its base model file {model!r} is gone", 409)
            size = os.path.getsize(model)
            if recorded is not None and size != recorded:  # other contents: the worker's hash decides
                raise JobError(f"job {name!r} cannot be resumed: its base model {spec.base.get('name')} changed on disk "
                               f"({recorded} bytes when the job started, {size} now); the checkpoint "
                               "belongs to the old weights. Start a new run for the new weights.", 409)
            self._restart(job, parse_devices(spec.gpu.get("device", "cpu")))
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

    def export(self, job: Job) -> str | None:
        """Copy the finished student into the students model folder (``StudentExporter.export``); once per
        finished iteration."""
        with self.lock:
            return self.exporter.export(job)

    def _restart(self, job: Job, devices) -> None:
        self.launcher.clear_last_run(job)
        self._spawn(job, devices)

    def _spawn(self, job: Job, devices: list[str] | None) -> None:
        self.launcher.spawn(job, devices)
        self.start_monitor()

    def _terminate(self, job: Job, sig) -> None:
        self.launcher.terminate(job, sig)

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
            summary = self.present(job)
            state = summary["state"]
            now = time.time()
            if state == jf.JobState.STOPPING.value and job.cancel_at is not None:
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


__all__ = ["ACTIVE", "HISTORY_CAP", "WORKER_SCRIPT", "NAME_PATTERN", "NAME_RULE", "PACK_ROOT", "RESUMABLE_STATES", "Job",
           "JobError", "JobManager", "check_run_name", "comfy_jobs_api", "jobs_root", "manager", "parse_devices",
           "register_routes", "students_dir"]
