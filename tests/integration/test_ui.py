"""`sftkit ui` in a real browser: Debian's chromium, headless, driven by Playwright for Python.

Runs are real (a tiny random-weight Llama trained by the real trainer); the server is the real app on a
free local port. `SFTKIT_WRITE_SCREENSHOTS=1 pytest tests/integration/test_ui.py` writes the README's
screenshots to docs/.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from sftkit.cli import main
from sftkit.config import ConfigError, load_config
from sftkit.trainer import train

from ..conftest import write_jsonl

pytest.importorskip("starlette", reason="the ui extra is not installed (pip install 'sftkit[ui]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[2] / "docs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_with_a_duplicate() -> list[dict]:
    rows = []
    for i in range(16):
        rows.append({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]})
    rows.append(rows[3])  # an exact duplicate: `data clean` removes it
    return rows


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ui") / "runs"
    data = write_jsonl(root.parent / "train.jsonl", rows_with_a_duplicate())
    common = {"model.name": str(tiny_model_dir), "data.train": str(data), "data.max_length": 96,
              "data.eval_fraction": 0.2, "train.max_steps": 4, "train.eval_every": 2, "train.batch_size": 4,
              "train.seed": 3}
    for name, lr in (("tiny", 1e-3), ("tiny-fast", 5e-3)):
        train(load_config(None, {**common, "train.lr": lr, "output_dir": str(root / name)}))
    held_out = write_jsonl(root.parent / "held_out.jsonl", rows_with_a_duplicate()[:4])
    assert main(["compare", str(tiny_model_dir), str(root / "tiny"), "--data", str(held_out), "--metrics",
                 "exact_match", "--max-new-tokens", "4"]) == 0  # report.md and compare.png for the run page
    # A run that has learnt one reply, so the chat test reads real words (a random model writes blanks).
    hello = write_jsonl(root.parent / "hello.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Hello from sftkit."}]}
        for q in ("hi", "hello", "What is 2 plus 2?", "hey", "who are you?", "good day", "yo", "greetings")])
    train(load_config(None, {"model.name": str(tiny_model_dir), "data.train": str(hello), "data.max_length": 64,
                             "peft.method": "full", "train.lr": 1e-2, "train.max_steps": 80, "train.batch_size": 8,
                             "eval.reference": None, "output_dir": str(root / "hello")}))
    bad = write_jsonl(root.parent / "bad.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'])
    with pytest.raises(Exception):  # noqa: B017 - any failure of the run; its status.json is what is checked
        train(load_config(None, {**common, "data.train": str(bad), "output_dir": str(root / "broken")}))
    (root.parent / "secret.txt").write_text("outside the runs folder")
    (root / "tiny" / "link-out").symlink_to(root.parent / "secret.txt")
    return root


@pytest.fixture(scope="module")
def server(runs_root):
    import uvicorn

    from sftkit.ui.app import create_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(runs_root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium): the browser tests need it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def tab(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def shot(page, name: str, tmp_path: Path) -> None:
    """Screenshots go to docs/ when asked (SFTKIT_WRITE_SCREENSHOTS=1), else beside the test."""
    folder = DOCS if os.environ.get("SFTKIT_WRITE_SCREENSHOTS") == "1" else tmp_path
    page.screenshot(path=str(folder / name), full_page=True)


def test_the_runs_table_lists_each_run_with_its_status(server, tab, tmp_path):
    url, _ = server
    tab.goto(url + "/")
    row = tab.locator("tr[data-run='tiny']")
    cells = row.locator("td").all_inner_texts()
    assert cells[1:4] == ["tiny", "sft", "lora"]
    assert cells[5] == "4"  # steps
    assert cells[-1] == "completed"
    broken = tab.locator("tr[data-run='broken'] td.status")
    status, why = broken.inner_text().split("\n", 1)
    assert status == "failed"
    assert why.endswith("bad.jsonl:1: messages[0]: no assistant turn to train on")  # the run's own error, from status.json
    shot(tab, "ui-runs.png", tmp_path)


def test_the_run_page_draws_curves_and_follows_new_metrics_lines(server, runs_root, tab, tmp_path):
    url, _ = server
    live = runs_root / "live"
    shutil.copytree(runs_root / "tiny", live, ignore=shutil.ignore_patterns("final", "summary.json", "link-out"))
    lines = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (live / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                                  "started": time.time()}))
    tab.goto(url + "/run/live")
    charts = tab.locator("#charts")
    tab.wait_for_function("document.querySelector('#charts').dataset.records === '2'")
    assert tab.locator("#status").inner_text() == "running"
    loss = tab.locator(".chart[data-metric='loss']")
    assert loss.locator("canvas").count() == 1 and loss.get_attribute("data-points") == "2"
    tab.evaluate("window.__same_page = true")
    with open(live / "metrics.jsonl", "a") as f:  # the trainer appends a step while the page is open
        f.write(lines[2] + "\n")
    tab.wait_for_function("document.querySelector('#charts').dataset.records === '3'", timeout=10_000)
    assert tab.evaluate("window.__same_page") is True  # no reload happened
    assert loss.get_attribute("data-points") == "3"
    assert charts.locator(".chart[data-metric='eval_loss']").get_attribute("data-points") == "1"
    shutil.rmtree(live)

    tab.goto(url + "/run/tiny")
    tab.wait_for_function("document.querySelector('#charts').dataset.records === '4'")
    assert tab.locator(".chart[data-metric='eval_loss']").get_attribute("data-points") == "2"
    assert "train:" in tab.locator("#config").inner_text()
    assert "exact_match" in tab.locator(".report pre").inner_text()  # report.md, rendered
    tab.wait_for_function("[...document.querySelectorAll('.report img')].some(i => i.complete && i.naturalWidth > 0)")
    shot(tab, "ui-run.png", tmp_path)


def test_compare_overlays_runs_and_diffs_their_configs(server, tab, tmp_path):
    url, _ = server
    tab.goto(url + "/")
    tab.locator("input.pick[value='tiny']").check()
    tab.locator("input.pick[value='tiny-fast']").check()
    tab.locator("#compare").click()
    tab.wait_for_function("document.querySelector('#charts') && document.querySelector('#charts').dataset.records === '8'")
    diff = tab.locator("#diff").inner_text()
    assert "train.lr" in diff and "output_dir" in diff
    assert "train.max_steps" not in diff
    assert tab.locator(".chart[data-metric='loss'] .u-legend .u-series").count() == 3  # step + two runs
    shot(tab, "ui-compare.png", tmp_path)


def test_the_data_page_marks_exactly_the_trained_tokens(server, runs_root, tab, tmp_path):
    url, _ = server
    export = tmp_path / "examples.jsonl"
    assert main(["data", "inspect", str(runs_root / "tiny" / "config.yaml"), "--export", str(export)]) == 0
    expected = [json.loads(line) for line in export.read_text().splitlines()][:5]
    tab.goto(url + "/data/tiny")
    samples = tab.locator(".sample")
    assert samples.count() == 5
    for i, ex in enumerate(expected):
        got = samples.nth(i).evaluate(
            "el => [...el.querySelectorAll('.tok')].map(s => [Number(s.dataset.id), s.classList.contains('t')])")
        assert got == [[t, label != -100] for t, label in zip(ex["input_ids"], ex["labels"])]
    removed = tab.locator("#removed").inner_text()
    assert "exact duplicate" in removed and "train.jsonl:17" in removed
    shot(tab, "ui-data.png", tmp_path)


def test_chat_streams_the_reply_the_model_gives(server, runs_root, tab, tmp_path):
    from sftkit.data import renderer_for
    from sftkit.generate import generate, load_for_inference

    url, _ = server
    model, tok, data_cfg = load_for_inference(str(runs_root / "hello"))
    want = generate(model, renderer_for(data_cfg, tok), [[{"role": "user", "content": "What is 2 plus 2?"}]],
                    max_new_tokens=256)[0]
    assert want == "Hello from sftkit."  # what the run learnt
    tab.goto(url + "/chat/hello")
    for turn in range(2):
        tab.locator("#message").fill("What is 2 plus 2?" if turn == 0 else "hey")
        tab.locator("#chatform button").first.click()
        tab.wait_for_selector(f".msg.assistant.done >> nth={turn}", timeout=60_000)
    replies = tab.locator(".msg.assistant.done").evaluate_all("els => els.map(e => e.textContent)")
    assert replies == [want, "Hello from sftkit."]
    assert tab.locator(".msg.user").count() == 2
    shot(tab, "ui-chat.png", tmp_path)
    tab.locator("#reset").click()
    assert tab.locator(".msg").count() == 0


def test_status_tells_a_live_run_from_a_killed_one(runs_root, tmp_path):
    import subprocess

    from sftkit.ui.runs import status

    run = tmp_path / "r"
    shutil.copytree(runs_root / "tiny", run, ignore=shutil.ignore_patterns("final", "summary.json"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, want in ((os.getpid(), "running"), (gone.pid, "failed")):
        (run / "status.json").write_text(json.dumps({"status": "running", "pid": pid, "host": socket.gethostname()}))
        assert status(run)[0] == want
    summary = json.loads((runs_root / "tiny" / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "stopped": "early stopping", "best_step": 2}))
    (run / "status.json").write_text(json.dumps({"status": "completed"}))
    assert status(run) == ("early-stopped", "best at step 2")


def test_the_core_never_imports_the_dashboard():
    import subprocess
    import sys

    code = ("import sys, sftkit.cli, sftkit.trainer, sftkit.tasks; "
            "assert not {'starlette', 'uvicorn', 'sftkit.ui'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def raw_get(port: int, path: str) -> int:
    """The path sent as it is (a browser would normalise `..` away before sending)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", path, skip_host=False)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.parametrize("path", ["/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/tiny/../../secret.txt",
                                  "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/tiny/link-out",
                                  "/run/..", "/run/%2e%2e", "/api/metrics/../ui", "/data/..%2F..%2Fetc"])
def test_paths_outside_the_runs_folder_are_refused(server, path):
    assert raw_get(server[1], path) == 404


@pytest.mark.parametrize("body, why", [("not json", "expected"), ("[1, 2]", "expected"), ('{"messages": []}', "end with a user"),
                                       ('{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": "many"}', "expected")])
def test_a_bad_chat_request_gets_400_with_the_reason(server, body, why):
    conn = http.client.HTTPConnection("127.0.0.1", server[1], timeout=10)
    conn.request("POST", "/api/chat/hello", body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 400 and why in json.loads(response.read())["error"]
    conn.close()


def test_files_inside_the_runs_folder_are_served(server):
    assert raw_get(server[1], "/files/tiny/config.yaml") == 200
    assert raw_get(server[1], "/files/tiny/plots/loss.png") == 200


def test_a_taken_port_gives_one_clear_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is taken"):
            from sftkit.ui import check_port

            check_port("127.0.0.1", port)
        assert main(["ui", "--port", str(port), "."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is taken" in err[0] and "--port" in err[0]
