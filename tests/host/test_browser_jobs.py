"""The jobs panel in a real browser: headless Chromium (the system's, from Debian) driven by Playwright's Python
package opens ComfyUI with the pack, opens the '1.x-Distill jobs' sidebar tab and sees a running job's progress
bar, speed, loss curve and preview update live; its Cancel button stops the job. The screenshot is kept at
/tmp/xslim_jobs_panel.png (and, with XSLIM_SAVE_JOBS_PANEL=<path>, there too: how docs/comfyui/ gets it)."""

from __future__ import annotations

import os
import shutil

import pytest

from browser_env import CHROMIUM, SKIP_MARKS, open_sidebar_tab, sync_playwright
from server_env import Server, make_base

ARTIFACT = "/tmp/xslim_jobs_panel.png"
pytestmark = SKIP_MARKS


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from xslim_lab.tiny import write_tiny_teacher

    base = make_base(tmp_path_factory.mktemp("comfy_browser"))
    write_tiny_teacher(os.path.join(base, "models", "diffusion_models", "tiny_teacher.safetensors"))
    os.makedirs(os.path.join(base, "user", "default"), exist_ok=True)
    with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
        f.write('{"Comfy.TutorialCompleted": true}')  # no first-visit templates dialog over the page
    server = Server(base).start()
    yield server
    for job in server.get("/xslim/jobs")["jobs"]:
        if job["can_cancel"]:
            server.request("POST", f"/xslim/jobs/{job['name']}/cancel", b'{"force": true}')
    server.stop()


def test_the_jobs_panel_shows_a_running_jobs_progress_and_loss_curve_and_cancels_it(srv):
    from test_train_jobs import DEMO, train_prompt, wait_job

    result = srv.run(train_prompt("browser-demo", model=DEMO, iterations=600, cached_blocks="4-6", lr_student=4e-5,
                                  lr_fake=3.2e-4, preview_every=10, checkpoint_every=50))
    assert result["status"]["status_str"] == "success", result["status"]
    wait_job(srv, "browser-demo", lambda j: j["state"] == "running" and j["iteration"] >= 25 and j["preview"], what="training")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(srv.url, wait_until="domcontentloaded")
            page.keyboard.press("Escape")  # any first-visit dialog
            # the tab our extension registered, by its title (the frontend's CSS for it changes between releases)
            open_sidebar_tab(page, "1.x-Distill")
            page.wait_for_selector('.xslim-job[data-job="browser-demo"][data-state="running"]', timeout=30_000)
            bar = page.locator('.xslim-job[data-job="browser-demo"] .xslim-job-bar')
            page.wait_for_function("""() => {
                const card = document.querySelector('.xslim-job[data-job="browser-demo"]');
                const fill = card && card.querySelector('.xslim-job-bar-fill');
                const loss = card && card.querySelector('img.xslim-job-loss');
                const preview = card && card.querySelector('img.xslim-job-preview');
                return fill && parseFloat(fill.style.width) > 0 && loss && loss.complete && loss.naturalWidth > 300
                    && preview && preview.complete && preview.naturalWidth > 0
                    && card.querySelector('.xslim-job-speed').textContent.includes('it/s');
            }""", timeout=30_000)
            first = float(bar.get_attribute("aria-valuenow"))  # percent
            # the websocket events move the bar without a reload: once the server reports more progress than the
            # bar shows (at the job's own pace, however busy the machine), the bar must follow
            wait_job(srv, "browser-demo", lambda j: 100 * j["progress"] > first + 1, what="more progress")
            page.wait_for_function("([sel, first]) => parseFloat(document.querySelector(sel).getAttribute('aria-valuenow')) > first",
                                   arg=['.xslim-job[data-job="browser-demo"] .xslim-job-bar', first], timeout=60_000)
            page.screenshot(path=ARTIFACT)
            target = os.environ.get("XSLIM_SAVE_JOBS_PANEL")
            if target:
                shutil.copyfile(ARTIFACT, target)
            page.locator('.xslim-job[data-job="browser-demo"] button.xslim-job-cancel').click()
            page.wait_for_selector('.xslim-job[data-job="browser-demo"][data-state="stopped"]', timeout=60_000)
            assert page.query_selector('.xslim-job[data-job="browser-demo"] button.xslim-job-resume') is not None
            assert not [e for e in errors if "xslim" in e.lower()], errors
        finally:
            browser.close()
    assert srv.get("/xslim/jobs/browser-demo")["state"] == "stopped"
