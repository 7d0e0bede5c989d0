"""The jobs as the panel sees them, read from their run folders (protocol: ``distill_core/jobfiles.py``).

Reading never writes: a summary is made from the folder's files, the folder lock and, for a worker this ComfyUI
started, its process handle. What a watcher must write (a crashed worker's final status, a finished student's
export) is the job manager's (``nodes/jobs.py``), which settles a job before it shows it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time

from distill_core import jobfiles as jf

log = logging.getLogger("xslim")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
HISTORY_CAP = 4000  # loss points kept per job in memory (halved by decimation when reached)
ACTIVE = jf.ACTIVE_STATES
RESUMABLE_STATES = jf.RESUMABLE_STATES


class JobError(Exception):
    """A refusal with an HTTP status: 400 bad input, 404 unknown job, 409 not possible in the job's state."""

    __module__ = "comfyui_xslim"  # the name ComfyUI shows next to the message, not the pack folder's path (host.py)

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


class Job:
    """One run folder and what this ComfyUI knows of it beyond the files: the worker it started, the loss history
    read so far, a stop it asked for."""

    def __init__(self, name: str, run_dir: str):
        self.name, self.run_dir = name, run_dir
        self.proc: subprocess.Popen | None = None
        self.offset, self.history, self.last = 0, [], {}
        self.cancel_at = self.term_at = None
        self.sent = None
        self.damage: str | None = None  # why the run folder could not be read, once said

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)


def crash_status(job: Job) -> jf.Status:
    """The final status of a worker this ComfyUI started that ended without writing one (it crashed or was
    killed): stopped when a stop was asked (only without its final save), else failed."""
    code = job.proc.returncode
    how = f"was killed by signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0 else f"exited with code {code}"
    log_tail = jf.tail(job.path(jf.LOG))
    asked = job.cancel_at is not None  # the user asked it to stop: stopped, only without its final save
    message = (f"{'stopped as asked, but ' if asked else ''}the worker process {how} without a final status; the "
               f"last checkpoint is kept and the job can be resumed. Last lines of its log ({job.path(jf.LOG)}):\n{log_tail}")
    return jf.Status(state=jf.JobState.STOPPED.value if asked else jf.JobState.FAILED.value, iteration=job.last.get("iteration"),
                     message=message, student=None, crashed=True, exit_code=code, time=time.time())


class JobStore:
    """Every job under ``root`` (default: ``<ComfyUI user dir>/xslim/distill``) and its summary, read-only."""

    def __init__(self, root: str | None = None):
        self._root = root
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}

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

    @staticmethod
    def last_word(job: Job) -> jf.Status | None:
        """The final status: the worker's, else, for a worker this ComfyUI started that ended without one, the
        crash (``crash_status``; the manager records it in the folder)."""
        status = jf.Status.read(job.run_dir)
        if status is None and job.proc is not None and job.proc.poll() is not None:
            return crash_status(job)
        return status

    def state(self, job: Job) -> str:
        if self._alive(job):
            if job.cancel_at is not None or os.path.exists(job.path(jf.STOP)):
                return jf.JobState.STOPPING.value
            beat = jf.Beat.read(job.run_dir) or jf.Beat()
            return jf.JobState.STARTING.value if beat.phase == "loading" else jf.JobState.RUNNING.value
        status = self.last_word(job)
        if status is not None:
            return status.state
        return jf.JobState.INTERRUPTED.value  # a worker of an earlier ComfyUI session stopped without a clean exit

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
            spec = jf.JobSpec.read(job.run_dir) or jf.JobSpec(config={}, base={})
            status = self.last_word(job)
            export = jf.ExportRecord.read(job.run_dir)
            beat = jf.Beat.read(job.run_dir) or jf.Beat()
            total = jf.count(spec.config.get("iterations"))
            iteration = jf.count(job.last.get("iteration", beat.iteration)) or 0
            preview = jf.latest_preview(job.run_dir)
            # the live run's own pace, never the run before a resume (nor a figure once the job has ended)
            speed, eta = jf.current_pace(job.last, beat) if state in ACTIVE else (None, None)
            return {
                "name": job.name, "state": state, "model": spec.base.get("name"), "family": spec.base.get("family"),
                "iteration": iteration, "iterations": total, "progress": min(1.0, iteration / total) if total else 0.0,
                "it_per_s": speed, "eta_s": eta,
                "losses": {k: v for k, v in job.last.items() if k.startswith("loss")},
                "preview": int(os.path.basename(preview)[:-4]) if preview else None,
                # the student of this run as it stands: an earlier export of a run trained on is not its result
                "student": export.student if export and state == jf.JobState.DONE.value else None,
                "message": self._message(state, status),
                "can_cancel": state in ACTIVE, "can_resume": state in RESUMABLE_STATES,
                "heartbeat_age_s": jf.heartbeat_age(job.run_dir), "created": spec.created,
            }

    def safe_summary(self, job: Job) -> dict:
        return self._guarded(job, self.summary)

    def _guarded(self, job: Job, summarise) -> dict:
        """``summarise(job)``, or, for a run folder whose files cannot be made sense of, that job alone as
        "damaged" with the reason: one bad folder never hides the other jobs."""
        try:
            summary = summarise(job)
            job.damage = None
            return summary
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            if job.damage != reason:  # said once per cause, not at every look
                job.damage = reason
                log.warning("1.x-Distill job %s: its run folder %s cannot be read (%s)", job.name, job.run_dir, reason)
            return {"name": job.name, "state": jf.JobState.DAMAGED.value, "model": None, "family": None, "iteration": 0,
                    "iterations": None, "progress": 0.0, "it_per_s": None, "eta_s": None, "losses": {}, "preview": None,
                    "student": None,
                    "message": f"this job's run folder cannot be read ({reason}); the other jobs are not affected. "
                               f"Look at the files in {job.run_dir}, or remove the folder.",
                    "can_cancel": False, "can_resume": False, "heartbeat_age_s": None, "created": None}

    @staticmethod
    def _message(state: str, status: jf.Status | None) -> str:
        if state == jf.JobState.INTERRUPTED.value:
            return ("the worker stopped without a clean exit (ComfyUI or the machine was restarted, or the worker was killed); "
                    "Resume continues from the last checkpoint")
        return "" if state in ACTIVE or status is None else status.message

    def detail(self, job: Job, summary: dict | None = None) -> dict:
        """``summary`` (default: ``safe_summary``) with the loss history, the job's settings and its log's tail."""
        with self.lock:
            out = dict(summary) if summary is not None else self.safe_summary(job)
            spec = jf.JobSpec.read(job.run_dir)
            out.update(history=job.history[-1000:], config=spec.config if spec else None, gpu=spec.gpu if spec else None,
                       log_tail=jf.tail(job.path(jf.LOG), 20))
            return out

    def list(self) -> list[dict]:
        return [self.safe_summary(job) for job in self.scan()]
