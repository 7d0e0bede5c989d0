"""Finished students into ComfyUI's ``students`` model folder: once per finished iteration, under the run's name,
never replacing a file the user did not ask to replace (then it takes the next free name and says so). The job
manager runs it when it sees a job done (its monitor, or before it shows the job) and on request."""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Callable

from distill_core import jobfiles as jf
from xslim_core.files import atomic_path
from .job_store import Job, JobError

log = logging.getLogger("xslim")


class StudentExporter:
    """``folder()`` names the students folder at the time of each export (ComfyUI's, which may change)."""

    def __init__(self, folder: Callable[[], str]):
        self.folder = folder

    def target(self, name: str, n: int = 1) -> str:
        return os.path.join(self.folder(), f"{name}.safetensors" if n == 1 else f"{name}_{n}.safetensors")

    @staticmethod
    def is_own_export(job: Job, target: str) -> bool:
        """Whether ``target`` is the very file this run exported before (which a new export replaces in place)."""
        record = jf.ExportRecord.read(job.run_dir)
        return record is not None and record.names(target)

    def check_target(self, name: str, overwrite: bool, job: Job | None) -> None:
        """Refuse a job whose student would replace a file of another, unless the user allowed it."""
        target = self.target(name)
        if os.path.exists(target) and not overwrite and not (job and self.is_own_export(job, target)):
            raise JobError(f"a student named {name}.safetensors already exists in {os.path.dirname(target)}; choose "
                           "another run name, or turn on overwrite_student to replace it when this job finishes", 409)

    def export(self, job: Job) -> str | None:
        """The file name of the finished student in the students folder, exporting it when this finished
        iteration has not been exported yet; None when the run left no student."""
        done = jf.ExportRecord.read(job.run_dir)
        status = jf.Status.read(job.run_dir)
        finished_at = status.iteration if status else None
        if done and done.iteration == finished_at:
            return done.student
        return self._export(job, finished_at)

    def _export(self, job: Job, iteration) -> str | None:
        source = job.path(jf.STUDENT)
        if not os.path.isfile(source):
            return None
        spec = jf.JobSpec.read(job.run_dir)
        overwrite = bool(spec.export.get("overwrite")) if spec else False
        os.makedirs(self.folder(), exist_ok=True)
        n = 1
        while True:
            target = self.target(job.name, n)
            replace = overwrite or self.is_own_export(job, target)
            if not replace and os.path.lexists(target):
                n += 1
                continue
            copied = False
            try:
                # a fresh, exclusively created temporary name: a planted file or link in the models folder is never
                # written through; without ``replace`` the file takes a name only while it is free
                with atomic_path(target, overwrite=replace) as tmp:
                    shutil.copyfile(source, tmp)
                    os.chmod(tmp, 0o644)
                    copied = True
                break
            except FileExistsError:  # the name was taken while the student was copied
                n += 1
            except OSError:
                if not copied:
                    raise
                if os.path.lexists(target):
                    n += 1
                    continue
                with atomic_path(target, overwrite=True) as tmp:  # no hard links on this file system: the name is free
                    shutil.copyfile(source, tmp)
                    os.chmod(tmp, 0o644)
                break
        st = os.stat(target)
        note = "" if n == 1 else f"{job.name}.safetensors appeared meanwhile and was kept; exported as {os.path.basename(target)}"
        jf.ExportRecord(student=os.path.basename(target), path=target, size=st.st_size, mtime_ns=st.st_mtime_ns,
                        iteration=iteration, note=note, time=time.time()).write(job.run_dir)
        log.info("1.x-Distill job %s: student exported to %s", job.name, target)
        return os.path.basename(target)
