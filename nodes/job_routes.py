"""The REST routes of the jobs panel (also under /api):

    GET  /xslim/jobs                     every job (summaries), and whether ComfyUI has its own jobs API
    GET  /xslim/jobs/{name}              one job: summary, loss history, log tail
    POST /xslim/jobs/{name}/cancel       save and stop (repeating it changes nothing); {"force": true} terminates it
    POST /xslim/jobs/{name}/resume       continue a stopped, interrupted or failed job from its checkpoint
    GET  /xslim/jobs/{name}/loss.png     the loss curves
    GET  /xslim/jobs/{name}/preview.png  the latest preview grid

Errors come back as JSON ``{"error": message}`` with 400 (bad input), 404 (no such job) or 409 (wrong state).
Every answer goes through one serializer (``jobfiles.dumps``: never NaN). The work is the job manager's
(``nodes/jobs.py``); here only requests and answers.
"""

from __future__ import annotations

import io as _io
import logging

from distill_core import jobfiles as jf
from .job_store import JobError

log = logging.getLogger("xslim")
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
    from .jobs import comfy_jobs_api, manager

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
        return reply({"jobs": await run_blocking(jobs.overview), "root": jobs.root, "comfy_jobs_api": comfy_jobs_api()})

    @routes.get("/xslim/jobs/{name}")
    @guarded
    async def get_job(request):
        return reply(await run_blocking(jobs.settled_detail, request.match_info["name"]))

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
