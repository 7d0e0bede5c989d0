"""Starting and stopping job workers: each one with ComfyUI's own Python in a new process group, so the queue
stays free, a crash of the worker cannot take ComfyUI down, and the worker outlives a ComfyUI restart (the next
ComfyUI finds it running by its folder lock). The worker itself is ``distill_core/worker.py``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from distill_core import jobfiles as jf
from .job_store import Job, crash_status

log = logging.getLogger("xslim")
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The worker's entry script (it finds its packages even where PYTHONPATH is ignored: embedded Pythons)
WORKER_SCRIPT = os.path.join(PACK_ROOT, "xslim_worker.py")


class JobLauncher:
    """The worker processes of this ComfyUI's jobs, and the signals a stop sends to any job's worker."""

    @staticmethod
    def clear_last_run(job: Job) -> None:
        """Before a worker continues a run: its last run's stop request, status and heartbeat go. export.json
        stays: it names the file this run exported before, which the next export replaces in place."""
        for stale in (jf.STOP, jf.STATUS, jf.HEARTBEAT):
            if os.path.exists(job.path(stale)):
                os.remove(job.path(stale))

    @staticmethod
    def spawn(job: Job, devices: list[str] | None) -> None:
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

    @staticmethod
    def reap(job: Job) -> None:
        """Record the end of a worker this ComfyUI started that exited without its last word (it crashed or was
        killed), so the job shows failed (or stopped, when a stop was asked) with its log's last lines."""
        if job.proc is None or job.proc.poll() is None or jf.Status.read(job.run_dir) is not None:
            return
        status = crash_status(job)
        if jf.is_locked(job.run_dir) is not True:  # never write into a folder a live worker owns
            status.write(job.run_dir)
        log.warning("1.x-Distill job %s: %s", job.name, status.message.splitlines()[0])
        job.proc = None

    @staticmethod
    def _worker_group(job: Job) -> int | None:
        if job.proc is not None and job.proc.poll() is None:
            return job.proc.pid  # a session leader: its group id is its pid
        beat = jf.Beat.read(job.run_dir) or jf.Beat()  # a worker started by an earlier ComfyUI session
        return beat.pgid or beat.pid

    def terminate(self, job: Job, sig) -> None:
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
