"""The prediction inspector in a real JupyterLab, in headless Chromium: the notebook's widgets render in the
page, and a filter chosen in the page reaches the kernel and comes back as a new view.

tests/test_widgets.py checks the Inspector's logic in Python; this checks the part Python cannot: that the
widget front end is installed and wired, so a notebook user actually sees the inspector and can drive it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium; scripts/setup.sh installs it
# Without the networking flags Chromium keeps dialling Google's hosts, which a closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() == "true"
TIME_LIMIT_S = 90  # the whole test, server start to last assertion; every wait takes from this budget
TESTS_DIR = Path(__file__).resolve().parent

INSPECTED_TYPES = ("nbi_status", "lesion_motion_direction")


def inspected_rows():
    """The test samples the notebook inspects (the kernel imports this too, so both sides agree)."""
    from surgvqa import data

    test = data.published_split()["test"]
    return [s for s in test if s.question_type in INSPECTED_TYPES][:12]


def inspector_notebook() -> dict:
    """A notebook that builds an Inspector over fake predictions and synthetic clips: no model, no network."""
    build = "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(TESTS_DIR)!r})",
        "from surgvqa.widgets import Inspector",
        "from test_browser import inspected_rows",
        "from test_widgets import clip_of, predictions",
        "rows = inspected_rows()",
        "inspector = Inspector(predictions(rows), {s.uid: s for s in rows}, clip_of)",
    ])
    cells = [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}
             for source in (build, "inspector.widget")]
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                        "language": "python"}}}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def ms(self) -> float:
        """What is left, in milliseconds (Playwright's unit); at least 1 so a late wait fails, not hangs."""
        return max(1.0, (self.end - time.monotonic()) * 1000)

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start_jupyterlab(root: Path, state: Path, log: Path, token: str, deadline: Deadline):
    """JupyterLab on a free loopback port, all its config, data and runtime files under ``state``.

    Returns the process and the base URL once the server answers."""
    env = dict(os.environ)
    env.update(JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_DATA_DIR=str(state / "data"),
               JUPYTER_RUNTIME_DIR=str(state / "runtime"), IPYTHONDIR=str(state / "ipython"),
               # the kernel must be this environment's Python, which has surgvqa
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", "--port=0",
               f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.allow_root=True",  # CI runs as root
               # nothing that reaches out: no announcements feed, no update check
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    # no "would you like news?" toast over the inspector (the server flags above stop the fetching itself)
    notification_settings = state / "config/lab/user-settings/@jupyterlab/apputils-extension"
    notification_settings.mkdir(parents=True)
    (notification_settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    with log.open("wb") as out:
        # its own process group, so that the kernel it starts is ended with it
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                  start_new_session=True)
    runtime = state / "runtime"
    while not deadline.expired():
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {server.returncode}:\n{tail(log)}")
        # the server writes its info file (with the port it bound) once it listens
        infos = sorted(runtime.glob("jpserver-*.json")) if runtime.exists() else []
        if infos:
            try:
                base = json.loads(infos[0].read_text())["url"].rstrip("/")
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        return server, base
            except (ValueError, KeyError, OSError):
                pass  # info file half written, or not answering yet
        time.sleep(0.25)
    stop(server)
    raise RuntimeError(f"JupyterLab did not answer within the time limit:\n{tail(log)}")


def stop(server: subprocess.Popen) -> None:
    """End the server and whatever it started: they share the process group the server leads."""
    def signal_group(signum):
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)  # the server shuts its kernel down on SIGTERM
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    signal_group(signal.SIGKILL)  # a server or kernel that did not stop in time
    server.wait()


# The frame grid's size and its top-left pixel's red value, or null until it has loaded. The grid is the
# inspector's first image (the flipbook comes after it); its pixels are read through a canvas, which stays
# readable because the image is a same-origin blob.
GRID_PIXEL_JS = """() => {
  const img = document.querySelector('.jp-OutputArea-output img.widget-image');
  if (!img || !img.complete || img.naturalWidth === 0) return null;
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  return [img.naturalWidth, img.naturalHeight, context.getImageData(0, 0, 1, 1).data[0]];
}"""


def expected_grid(sample) -> list[int]:
    from test_widgets import clip_of

    from surgvqa.widgets import frame_grid

    clip = clip_of(sample)
    grid = frame_grid(clip)
    return [grid.shape[1], grid.shape[0], int(clip[0, 0, 0, 0])]


def wait_for_grid(page, sample, deadline: Deadline) -> None:
    want = expected_grid(sample)
    try:
        page.wait_for_function(f"want => JSON.stringify(({GRID_PIXEL_JS})()) === JSON.stringify(want)",
                               arg=want, timeout=deadline.ms())
    except Exception as e:
        e.add_note(f"frame grid of {sample.uid}: wanted [width, height, red] {want}, "
                   f"page shows {page.evaluate(GRID_PIXEL_JS)}")
        raise


def require_browser() -> None:
    """Skip where Chromium or Playwright is missing; in CI either missing is a failure."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found (Debian package chromium; scripts/setup.sh installs it as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright not installed (pip install -e '.[test]')")


@pytest.mark.slow
def test_inspector_renders_in_jupyterlab_and_follows_a_filter(tmp_path):
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    from test_widgets import predictions

    rows = inspected_rows()
    table = predictions(rows)
    # filter to the type the first sample is not, so both the count and the sample shown must change
    filtered_type = next(t for t in INSPECTED_TYPES if t != rows[0].question_type)
    filtered = [s for s in rows if s.question_type == filtered_type]
    assert filtered and len(filtered) < len(rows), "the filter must narrow the view"

    deadline = Deadline(TIME_LIMIT_S)
    root, state, log = tmp_path / "lab", tmp_path / "jupyter", tmp_path / "jupyterlab.log"
    root.mkdir()
    (root / "inspector.ipynb").write_text(json.dumps(inspector_notebook(), indent=1))
    token = secrets.token_hex(16)
    server, base = start_jupyterlab(root, state, log, token, deadline)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS,
                                                 headless=True, timeout=deadline.ms())
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                try:
                    drive_inspector(page, expect, base, token, rows, table, filtered_type, filtered, deadline)
                except Exception as e:
                    e.add_note(f"JupyterLab log:\n{tail(log)}")
                    try:
                        screenshot = tmp_path / "inspector-failure.png"
                        page.screenshot(path=str(screenshot), full_page=True, timeout=10_000)
                        outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
                        e.add_note(f"screenshot: {screenshot}\nnotebook outputs: {outputs}")
                    except Exception as failed:  # a crashed page: the original error matters more
                        e.add_note(f"no screenshot: {failed}")
                    raise
            finally:
                browser.close()
    finally:
        stop(server)


def drive_inspector(page, expect, base, token, rows, table, filtered_type, filtered, deadline: Deadline) -> None:
    page.goto(f"{base}/lab/tree/inspector.ipynb?token={token}", timeout=deadline.ms())
    # Run only once the kernel is connected: before that JupyterLab drops a cell's execution silently. The
    # status bar's "<kernel> | Idle" says so; the toolbar's execution indicator can read "idle" before it.
    page.locator(".jp-StatusBar-Item", has_text=re.compile(r"\| Idle$")).wait_for(timeout=deadline.ms())
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click(timeout=deadline.ms())
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click(timeout=deadline.ms())

    view = page.locator(".jp-OutputArea-output")
    count = view.locator("div.widget-label", has_text=re.compile(r"^\d+ of \d+$"))
    answer = view.locator(".widget-html-content", has_text="question:")
    expect(count).to_have_text(f"1 of {len(rows)}", timeout=deadline.ms())
    expect(answer).to_contain_text(f"{rows[0].uid} · {rows[0].question_type}", timeout=deadline.ms())
    wait_for_grid(page, rows[0], deadline)

    # the question-type filter, changed in the page as a user would
    type_filter = view.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile(r"^type$")))
    type_filter.locator("select").select_option(value=filtered_type, timeout=deadline.ms())

    expect(count).to_have_text(f"1 of {len(filtered)}", timeout=deadline.ms())
    first = filtered[0]
    expect(answer).to_contain_text(f"{first.uid} · {filtered_type}", timeout=deadline.ms())
    expected_parsed = table.set_index("uid").loc[first.uid, "parsed"]
    expect(answer).to_contain_text(f"prediction: {expected_parsed}", timeout=deadline.ms())
    wait_for_grid(page, first, deadline)


# --- the demo, asked out loud ----------------------------------------------------------------------------

DEMO_TIME_LIMIT_S = 150  # each run: server start, the model loaded in the kernel, a recording, the answer


def demo_rows():
    from surgvqa import data

    test = data.published_split()["test"]
    return [s for s in test if s.question_type in ("nbi_status", "tool_identification")][:6]


def demo_for_browser():
    """The notebook's demo on the shipped tiny model (the kernel imports this, the test answers with it too)."""
    from functools import partial

    from surgvqa import frames
    from surgvqa.model import REPO_ROOT, load_checkpoint
    from surgvqa.widgets import Demo, audio_reader, model_answerer

    model = load_checkpoint(REPO_ROOT / "checkpoints" / "tiny-phantom")
    load_frames = partial(frames.load_clip, cfg=model.cfg)
    answer = model_answerer(model, model.cfg, load_frames)
    demo = Demo(demo_rows(), load_frames, own_audio=lambda s: None, read_audio=audio_reader(model.cfg), answer=answer)
    return demo, answer, audio_reader(model.cfg)


def demo_notebook() -> dict:
    build = "\n".join(["import sys", f"sys.path.insert(0, {str(TESTS_DIR)!r})",
                       "from test_browser import demo_for_browser", "demo, _, _ = demo_for_browser()"])
    notebook = inspector_notebook()
    notebook["cells"][0]["source"], notebook["cells"][1]["source"] = build, "demo.widget"
    return notebook


def spoken_question_wav(path: Path) -> Path:
    import soundfile as sf

    from surgvqa import get_config, tts

    cfg = get_config()
    voice = tts.voice_pools(cfg.tts_engine, cfg.disjoint_voices)["test"][0]
    wave = tts.render(demo_rows()[0].question, voice, cfg.sample_rate)
    sf.write(path, wave, cfg.sample_rate, subtype="PCM_16")
    return path


def ask_out_loud(tmp_path: Path, wav: Path, seconds: float):
    """Record ``seconds`` of Chromium's fake microphone (which plays ``wav`` once) in the demo, in a
    JupyterLab started here; returns the demo's result text and whether an answer was shown."""
    from playwright.sync_api import expect, sync_playwright

    deadline = Deadline(DEMO_TIME_LIMIT_S)
    root, state, log = tmp_path / "lab", tmp_path / "jupyter", tmp_path / "jupyterlab.log"
    root.mkdir(parents=True)
    (root / "demo.ipynb").write_text(json.dumps(demo_notebook(), indent=1))
    token = secrets.token_hex(16)
    server, base = start_jupyterlab(root, state, log, token, deadline)
    media = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}%noloop"]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS + media,
                                                 headless=True, timeout=deadline.ms())
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                page.goto(f"{base}/lab/tree/demo.ipynb?token={token}", timeout=deadline.ms())
                page.locator(".jp-StatusBar-Item", has_text=re.compile(r"\| Idle$")).wait_for(timeout=deadline.ms())
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click(timeout=deadline.ms())
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click(timeout=deadline.ms())
                page.locator("button.surgvqa-record").click(timeout=deadline.ms())
                status = page.locator(".surgvqa-record-status")
                expect(status).to_have_text("recording…", timeout=deadline.ms())
                page.wait_for_timeout(1000 * seconds)
                page.locator("button.surgvqa-stop").click(timeout=deadline.ms())
                expect(status).to_contain_text("recorded", timeout=deadline.ms())
                result = page.locator(".jp-OutputArea-output .widget-html-content",
                                      has_text=re.compile("understood:|nothing answered"))
                result.wait_for(timeout=deadline.ms())
                return result.inner_text(), page.locator(".surgvqa-answer").count() > 0
            except Exception as e:
                e.add_note(f"JupyterLab log:\n{tail(log)}")
                screenshot = tmp_path / "demo-failure.png"
                page.screenshot(path=str(screenshot), full_page=True, timeout=10_000)
                e.add_note(f"screenshot: {screenshot}")
                raise
            finally:
                browser.close()
    finally:
        stop(server)


@pytest.mark.slow
def test_the_demo_answers_a_question_asked_into_the_microphone_and_refuses_silence(tmp_path):
    require_browser()
    import numpy as np
    import soundfile as sf

    wav = spoken_question_wav(tmp_path / "question.wav")
    _, answer, read_audio = demo_for_browser()
    expected = answer(demo_rows()[0], read_audio(wav.read_bytes(), wav.name))
    shown, answered = ask_out_loud(tmp_path / "spoken", wav, sf.info(str(wav)).duration + 1.0)
    assert answered, shown
    assert f"understood: {expected.question_type}" in shown and f"answer: {expected.label}" in shown, (shown, expected)

    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(32000, np.float32), 16000, subtype="PCM_16")
    shown, answered = ask_out_loud(tmp_path / "silent", silent, 2.0)
    assert not answered and "silent" in shown and "nothing answered" in shown, shown
