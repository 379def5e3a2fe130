"""End to end in headless Chromium: the page uploads (or records) audio and shows the model's answer.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright``
Python package; Playwright's own browser download is never used. Skips cleanly
when either is missing. ``RESPIRAMFM_CHROMIUM`` overrides the browser path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("RESPIRAMFM_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def browser(tmp_path_factory, recordings):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is absent (install Debian's chromium: apt-get install -y chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    # The microphone is Chromium's fake capture device playing a real KAUH recording.
    media = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={recordings[8]}"]
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                    args=FLAGS + media, viewport={"width": 1000, "height": 900})
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture()
def page(browser, live_server):
    """A fresh tab that records every request and every console error or page error."""
    browser.grant_permissions(["microphone"], origin=live_server)
    tab = browser.new_page()
    tab.requests, tab.problems = [], []
    tab.on("request", lambda r: tab.requests.append(r.url))
    tab.on("console", lambda m: tab.problems.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.problems.append(str(e)))
    tab.goto(live_server + "/")
    tab.wait_for_selector("#task option[value='T4']", state="attached")
    yield tab
    tab.close()


def _only_local(tab, base: str) -> None:
    outside = [u for u in tab.requests if not u.startswith((base + "/", "data:", "blob:"))]
    assert not outside, f"requests outside the server: {outside}"


def test_upload_symptoms_and_predict(page, live_server, predictor, recordings, tmp_path):
    assert "Research tool only - not a diagnosis." in page.inner_text("#notice")
    assert page.is_hidden("#playback") and page.is_hidden("#result")
    page.set_input_files("#audio-file", str(recordings[0]))
    page.wait_for_selector("#playback", state="visible")  # the chosen file can be played back
    page.get_by_label("dry cough").check()
    page.get_by_label("wheezing").check()
    text = page.input_value("#symptoms")
    assert text == "Patient presents with the following respiratory symptoms: dry cough, wheezing."
    page.select_option("#task", "T4")
    assert "ICBHI" in page.inner_text("#task-description")
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        page.click("#submit-btn")
    assert answer.value.status == 200
    page.wait_for_selector("#result", state="visible")
    want = predictor.predict(audio_path=recordings[0], symptoms=text, task="T4")["probability"]
    assert page.inner_text("#probability") == f"{100 * want:.1f}%"
    assert answer.value.json()["probability"] == want
    assert "COPD (T4)" in page.inner_text("#result-disease")
    assert "audio + context" in page.inner_text("#result-meta")
    # (no wait_for_function: the page's CSP forbids the eval it relies on)
    page.locator("#spectrogram").evaluate("img => img.decode()")
    assert page.locator("#spectrogram").evaluate("img => img.naturalWidth") == 700
    words = page.locator("#attention-words span")
    assert words.count() >= 10 and "wheezing." in page.inner_text("#attention-words")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 20000
    _only_local(page, live_server)
    assert not page.problems, (page.problems, page.requests)  # no script errors, no CSP violations, no 404s


def test_record_in_browser_and_errors(page, live_server, tmp_path):
    # nothing given: the page refuses before sending. This model records no trained task, so no task is
    # preselected (the page never picks one the model did not train on) and the task is asked for first
    assert page.input_value("#task") == ""
    page.click("#submit-btn")
    assert "Choose a task first." in page.inner_text("#error")
    page.select_option("#task", "T7")
    page.click("#submit-btn")
    assert "Add a recording and/or symptoms first." in page.inner_text("#error")
    # record ~2 s from the (fake) microphone: MediaRecorder gives webm/opus
    page.click("#record-btn")
    page.wait_for_selector("#record-status:has-text('Recording... 2')")
    page.click("#stop-btn")
    page.wait_for_selector("#playback", state="visible")
    page.fill("#symptoms", "fever and a wet cough")
    page.select_option("#task", "T7")
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        page.click("#submit-btn")
    body = answer.value.json()
    assert answer.value.status == 200, body
    assert body["audio"]["format"] == "webm" and body["audio"]["seconds"] > 1.0
    page.wait_for_selector("#result", state="visible")
    assert page.inner_text("#probability") == f"{100 * body['probability']:.1f}%"
    assert page.is_hidden("#error")
    page.screenshot(path=str(tmp_path / "recorded.png"), full_page=True)
    # a file that is not audio: the server's error is shown
    bad = tmp_path / "notes.wav"
    bad.write_bytes(b"definitely not audio " * 50)
    page.set_input_files("#audio-file", str(bad))
    page.click("#submit-btn")
    page.wait_for_selector("#error", state="visible")
    assert "undecodable_audio (HTTP 400)" in page.inner_text("#error")
    _only_local(page, live_server)
    assert not [p for p in page.problems if "400" not in p], page.problems  # only the expected failed request
