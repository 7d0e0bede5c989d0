"""The background training worker: one process per job, reporting only through its run folder.

    python -m distill_core.worker --run-dir DIR            # DIR holds job.json (see jobfiles.py)
    torchrun --nproc_per_node 2 -m distill_core.worker --run-dir DIR

It imports nothing of ComfyUI itself: a text-family job's ``bootstrap`` makes ComfyUI's model code importable for
its loader, and ComfyUI's ``server`` is never imported. It takes the folder's lock (a second worker on the same
folder exits at once), refuses to resume when the job's fingerprint (base model hash, prompts, settings) differs
from the one the run was started with, keeps a heartbeat, trains with ``runtime.run_training`` (which resumes
exactly and checkpoints atomically), stops cleanly when a ``stop`` file appears (a checkpoint and the student are
saved), and always ends with a ``status.json`` saying done, stopped or failed and why. Under torchrun only rank 0
touches the folder's files; a stop request reaches every rank at the same iteration.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict

from . import jobfiles as jf
from .logs import log, show_on_stdout

JOB_FORMAT = jf.JOB_FORMAT
EXIT_DONE, EXIT_FAILED, EXIT_REFUSED, EXIT_BUSY = 0, 1, 2, 3


ResumeRefused = jf.ResumeRefused


def _say(message: str) -> None:
    log.info("[1.x-Distill worker] %s", message)


class Heartbeat:
    """Rewrites heartbeat.json every few seconds from its own thread, so a long iteration or a slow model load
    never looks like a dead worker."""

    def __init__(self, run_dir: str, total: int | None = None, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        pgid = os.getpgid(0) if hasattr(os, "getpgid") else None  # what a watcher signals to stop the whole job
        self.beat = jf.Beat(pid=os.getpid(), pgid=pgid, started=time.time(), iterations=total)
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xslim-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        if self.enabled:
            self.write()
            self._thread.start()
        return self

    def write(self) -> None:
        try:
            self.beat.write(self.run_dir)
        except OSError:  # a full disk must not kill the training; the watcher will see a stale heartbeat
            pass

    def _loop(self) -> None:
        while not self._quit.wait(jf.HEARTBEAT_EVERY_S):
            self.write()

    def progress(self, record: dict) -> None:
        self.beat.iteration, self.beat.phase = record["iteration"], "training"

    def stop(self, phase: str = "exited") -> None:
        self._quit.set()
        if self.enabled:
            if self._thread.is_alive():
                self._thread.join(5)
            self.beat.phase = phase
            self.write()


class StopRequest:
    """The ``stop`` callable for run_training: true once ``<run>/stop`` exists. Under torchrun every rank
    agrees (an all-reduce at the same point of every iteration), so no rank is left waiting in a collective."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, jf.STOP)

    def __call__(self) -> bool:
        seen = os.path.exists(self.path)
        from .updates import Ranks

        ranks = Ranks()
        return seen if not ranks.active else not ranks.all_true(not seen)


def bootstrap(job: dict) -> None:
    """What the submitter says this process needs importable before the model loads: extra ``sys_path`` entries
    (e.g. ComfyUI's folder) and ``packages`` registered by name from a folder (e.g. the node pack, so a teacher
    loader such as ``comfyui_xslim.nodes.distill_host:...`` resolves). Nothing ComfyUI-specific lives here."""
    from xslim_core.packages import register_package

    spec = job.get("bootstrap") or {}
    for folder in spec.get("sys_path", []):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    for name, root in (spec.get("packages") or {}).items():
        try:
            register_package(name, root)
        except ValueError as err:
            raise ValueError(f"job.json bootstrap: {err}") from None


def load_job(run_dir: str):
    """The run config (its run_dir forced to this folder) and the base model description from job.json."""
    from .config import RunConfig
    from .student import file_hash

    spec = jf.JobSpec.read(run_dir)
    if spec is None:
        raise ValueError(f"{run_dir} has no readable {jf.JOB}; start jobs through the job manager or write one")
    if spec.format != JOB_FORMAT:
        raise ValueError(f"{jf.JOB} has format {spec.format!r}, expected {JOB_FORMAT!r}")
    cfg = RunConfig.from_dict({**spec.config, "run_dir": run_dir})
    if not cfg.teacher or not os.path.isfile(cfg.teacher):
        raise ValueError(
            f"the base model file {cfg.teacher!r} does not exist (it was moved or deleted after the job was made)"
        )
    base = {**spec.base, "hash": file_hash(cfg.teacher)}
    return spec.to_json(), cfg, base


def check_fingerprint(run: jf.OpenRun, cfg, base: dict) -> None:
    """Refuse early (before torchrun's process group) when the base model, the prompts or settings changed. The
    fingerprint holds both the submitter's identities of the prompt list and text encoder (from job.json) and the
    hash of the encoded prompt set in the run folder. ``run_training`` then finds the folder open and checked."""
    run.check(asdict(cfg), {**base, "prompts": _prompts_hash(cfg.prompts_path)})


def _prompts_hash(path: str | None) -> str | None:
    """The run's prompt-set hash from its file's header (written by ``PromptSet.save``), without loading it."""
    if not path:
        return None
    try:
        return jf.safetensors_header(path)[1].get("hash")
    except (OSError, ValueError):
        return None  # the trainer reports a missing or damaged prompt set by name when it loads it


def apply_gpu_sharing(job: dict) -> None:
    """shared: cap this process's share of its GPU's memory. The devices themselves are chosen by the submitter
    through CUDA_VISIBLE_DEVICES before the process starts; under torchrun each rank caps its own device
    (``cuda:LOCAL_RANK``), not device 0."""
    gpu = job.get("gpu") or {}
    import torch

    if gpu.get("mode") == "shared" and torch.cuda.is_available():
        from .parallel import pick_device

        device = pick_device(job["config"].get("device") or "cuda")
        if device.type == "cuda":
            fraction = float(gpu.get("memory_fraction", 0.5))
            torch.cuda.set_per_process_memory_fraction(fraction, device)
            _say(f"shared GPU: capped at {fraction:.0%} of {device}'s memory")
    where = job["config"].get("device") or "cpu"
    _say(f"training on {where} with {job['config'].get('threads', 2)} CPU thread(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run one 1.x-Distill job from its run folder (see distill_core/jobfiles.py)."
    )
    parser.add_argument("--run-dir", required=True, help="the run folder holding job.json")
    args = parser.parse_args(argv)
    show_on_stdout()
    run_dir = os.path.abspath(args.run_dir)
    if not os.path.isdir(run_dir):
        print(f"[1.x-Distill worker] no run folder {run_dir}", file=sys.stderr)
        return EXIT_FAILED
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    run = jf.OpenRun(run_dir, main=is_main)
    try:
        run.open()
    except jf.RunFolderBusy as err:
        print(f"[1.x-Distill worker] {err}; this worker leaves it alone", file=sys.stderr)
        return EXIT_BUSY
    if is_main and os.path.exists(
        os.path.join(run_dir, jf.STATUS)
    ):  # the run is live again; an old final word would mislead watchers
        os.remove(os.path.join(run_dir, jf.STATUS))
    beat = Heartbeat(run_dir, enabled=is_main).start()
    outcome, code = jf.Status(state="failed"), EXIT_FAILED
    distributed = ended_together = False
    try:
        job, cfg, base = load_job(run_dir)
        bootstrap(job)
        beat.beat.iterations = cfg.iterations
        check_fingerprint(run, cfg, base)
        if world > 1:
            from .parallel import init_distributed

            init_distributed(cfg.device)  # NCCL on GPUs, gloo on the CPU
            distributed = True
        apply_gpu_sharing(job)
        from .runtime import run_training

        result = run_training(cfg, progress=beat.progress, stop=StopRequest(run_dir))
        ended_together = True  # run_training returned on every rank (its collectives keep them in step)
        outcome = jf.Status(
            state=result["status"],
            iteration=result["iteration"],
            message=result["message"],
            student=result["student"] and os.path.basename(result["student"]),
        )
        code = EXIT_FAILED if result["status"] == "failed" else EXIT_DONE
    except ResumeRefused as err:
        outcome.message, code = str(err), EXIT_REFUSED
        _say(str(err))
    except Exception as err:  # anything else: the job is failed, with the reason where a person will look
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        outcome.message = f"{type(err).__name__}: {err}"
        outcome.error = text[-4000:]
    finally:
        beat.stop()
        if distributed:
            from .parallel import shutdown

            shutdown(synchronize=ended_together)
        if is_main:
            outcome.time, outcome.pid = time.time(), os.getpid()
            outcome.write(run_dir)
            stop = os.path.join(run_dir, jf.STOP)
            if os.path.exists(stop):  # acted on; a later resume must not stop at once
                os.remove(stop)
        run.close()
    if is_main:  # every rank ends with the same outcome: one final line, from rank 0
        _say(f"{outcome.state} at iteration {outcome.iteration}" + (f": {outcome.message}" if outcome.message else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
