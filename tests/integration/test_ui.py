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
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from sftkit.cli import main
from sftkit.config import ConfigError, load_config
from sftkit.reviews import read_reviews, review_pairs
from sftkit.trainer import train

from ..conftest import write_jsonl

pytestmark = pytest.mark.slow  # end to end on a real tiny model: `pytest -m 'not slow'` leaves it out

pytest.importorskip("starlette", reason="the ui extra is not installed (pip install 'sftkit[ui]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "test-launch-token"
AUTH = {"authorization": f"token {TOKEN}"}


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
    app = create_app(runs_root, TOKEN)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port, app.dashboard
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
def tab(browser, server):
    """A browser tab that opened the address `sftkit ui` prints (with the token), as a user does: the
    token is kept in a cookie from then on."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server[0] + f"/?token={TOKEN}")
    yield page
    context.close()


def wait_until(page, expression: str, timeout: int = 30_000) -> None:
    """Playwright's wait_for_function evaluates its string in the page, which the dashboard's CSP
    (no eval) rightly refuses: poll from here instead."""
    deadline = time.time() + timeout / 1000
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def shot(page, name: str, tmp_path: Path) -> None:
    """Screenshots go to docs/ when asked (SFTKIT_WRITE_SCREENSHOTS=1), else beside the test."""
    folder = DOCS if os.environ.get("SFTKIT_WRITE_SCREENSHOTS") == "1" else tmp_path
    page.screenshot(path=str(folder / name), full_page=True)


def test_the_runs_table_lists_each_run_with_its_status(server, tab, tmp_path):
    url = server[0]
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
    url = server[0]
    live = runs_root / "live"
    shutil.copytree(runs_root / "tiny", live, ignore=shutil.ignore_patterns("final", "summary.json", "link-out"))
    lines = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (live / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                                  "started": time.time()}))
    tab.goto(url + "/run/live")
    charts = tab.locator("#charts")
    wait_until(tab, "document.querySelector('#charts').dataset.records === '2'")
    assert tab.locator("#status").inner_text() == "running"
    loss = tab.locator(".chart[data-metric='loss']")
    assert loss.locator("canvas").count() == 1 and loss.get_attribute("data-points") == "2"
    tab.evaluate("window.__same_page = true")
    with open(live / "metrics.jsonl", "a") as f:  # the trainer appends a step while the page is open
        f.write(lines[2] + "\n")
    wait_until(tab, "document.querySelector('#charts').dataset.records === '3'", timeout=10_000)
    assert tab.evaluate("window.__same_page") is True  # no reload happened
    assert loss.get_attribute("data-points") == "3"
    assert charts.locator(".chart[data-metric='eval_loss']").get_attribute("data-points") == "1"
    shutil.rmtree(live)

    tab.goto(url + "/run/tiny")
    wait_until(tab, "document.querySelector('#charts').dataset.records === '4'")
    assert tab.locator(".chart[data-metric='eval_loss']").get_attribute("data-points") == "2"
    assert "train:" in tab.locator("#config").inner_text()
    assert "exact_match" in tab.locator(".report pre").inner_text()  # report.md, rendered
    wait_until(tab, "[...document.querySelectorAll('.report img')].some(i => i.complete && i.naturalWidth > 0)")
    shot(tab, "ui-run.png", tmp_path)


def test_named_eval_sets_get_a_chart_each_and_their_names_are_text(server, runs_root, tab):
    sets = runs_root / "sets"
    shutil.copytree(runs_root / "tiny", sets, ignore=shutil.ignore_patterns("link-out"))
    records = [json.loads(x) for x in (sets / "metrics.jsonl").read_text().splitlines()]
    odd = "<img src=x onerror=window.__set_ran=1>"
    for r in records:  # as a run with data.eval {sums: ..., <odd>: ...} logs its evals
        if "eval_loss" in r:
            r.update({"eval/sums/eval_loss": r["eval_loss"] + 0.1, f"eval/{odd}/eval_loss": r["eval_loss"] - 0.1,
                      "eval/sums/eval_ppl": 2.0})
    (sets / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tab.goto(server[0] + "/run/sets")
    wait_until(tab, f"document.querySelector('#charts').dataset.records === '{len(records)}'")
    chart = tab.locator(".chart[data-metric='eval/sums/eval_loss']")
    assert chart.get_attribute("data-points") == "2" and not chart.is_hidden()
    assert chart.locator(".u-title").inner_text() == "eval loss: set sums"
    other = tab.locator(".chart").filter(has_text="eval loss: set <img")
    assert other.count() == 1 and other.get_attribute("data-points") == "2"
    assert other.locator(".u-title").inner_text() == f"eval loss: set {odd}"
    assert tab.locator("#charts img").count() == 0 and tab.evaluate("window.__set_ran") is None
    assert tab.locator(".chart[data-metric='eval/sums/eval_ppl']").count() == 0  # perplexity: the loss says it
    shutil.rmtree(sets)


def test_the_compare_page_shows_the_comparison_table_of_a_run_as_text(server, runs_root, tab):
    odd = runs_root / "tiny" / "compare" / "<img src=x onerror=window.__cmp_ran=1>"
    shutil.copytree(runs_root / "tiny" / "compare" / "base", odd)
    try:
        tab.goto(server[0] + "/run/tiny")
        tab.locator("#comparison").click()  # the run page links to it
        table = tab.locator("table.comparison[data-run='tiny']")
        rows = table.locator("tr").all_inner_texts()
        assert [r.split("\t")[0] for r in rows] == ["row", "base", odd.name, "tuned"]
        assert "exact_match" in rows[0] and "prompt_tokens" in rows[0] and rows[0].endswith("seconds_per_answer")
        base = json.loads((runs_root / "tiny" / "compare" / "base" / "eval.json").read_text())["metrics"]
        assert f"{base['exact_match']:.4f}" in rows[1]
        assert table.locator("img").count() == 0 and tab.evaluate("window.__cmp_ran") is None
    finally:
        shutil.rmtree(odd)


def test_compare_overlays_runs_and_diffs_their_configs(server, tab, tmp_path):
    url = server[0]
    tab.goto(url + "/")
    tab.locator("input.pick[value='tiny']").check()
    tab.locator("input.pick[value='tiny-fast']").check()
    tab.locator("#compare").click()
    wait_until(tab, "document.querySelector('#charts') && document.querySelector('#charts').dataset.records === '8'")
    diff = tab.locator("#diff").inner_text()
    assert "train.lr" in diff and "output_dir" in diff
    assert "train.max_steps" not in diff
    assert tab.locator(".chart[data-metric='loss'] .u-legend .u-series").count() == 3  # step + two runs
    shot(tab, "ui-compare.png", tmp_path)


def test_the_data_page_marks_exactly_the_trained_tokens(server, runs_root, tab, tmp_path):
    url = server[0]
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

    url = server[0]
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


def raw(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
        auth: bool = True) -> tuple[int, dict, bytes]:
    """The path sent as it is (a browser would normalise `..` away before sending); the token as a header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host="host" in {k.lower() for k in headers or {}})
    for k, v in {**(AUTH if auth else {}), **(headers or {})}.items():
        conn.putheader(k, v)
    if body is not None and "content-length" not in {k.lower() for k in headers or {}}:
        conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    out = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return out


def raw_get(port: int, path: str) -> int:
    return raw(port, "GET", path)[0]


def post_json(port: int, path: str, payload, headers: dict | None = None) -> tuple[int, dict, bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return raw(port, "POST", path, {"content-type": "application/json", **(headers or {})}, body)


@pytest.mark.parametrize("path", ["/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/tiny/../../secret.txt",
                                  "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/tiny/link-out",
                                  "/run/..", "/run/%2e%2e", "/api/metrics/../ui", "/data/..%2F..%2Fetc"])
def test_paths_outside_the_runs_folder_are_refused(server, path):
    assert raw_get(server[1], path) == 404


@pytest.mark.parametrize("body, why", [("not json", "expected"), ("[1, 2]", "expected"), ('{"messages": []}', "end with a user"),
                                       ('{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": "many"}', "expected")])
def test_a_bad_chat_request_gets_400_with_the_reason(server, body, why):
    status, _, answer = post_json(server[1], "/api/chat/hello", body.encode())
    assert status == 400 and why in json.loads(answer)["error"]


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


# -- the dashboard as a local server: token, Host, origin, escaping, bad input (docs/security.md) ------
def test_every_request_needs_the_launch_token(server):
    port = server[1]
    for path in ("/", "/run/tiny", "/api/runs", "/files/tiny/config.yaml", "/static/app.js"):
        status, _, body = raw(port, "GET", path, auth=False)
        assert status == 403 and b"launch token" in body, path
    assert raw(port, "GET", "/?token=wrong", auth=False)[0] == 403
    status, headers, _ = raw(port, "GET", f"/?token={TOKEN}", auth=False)
    assert status == 200 and f"sftkit_token={TOKEN}" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    assert raw(port, "GET", "/api/runs", {"cookie": f"sftkit_token={TOKEN}"}, auth=False)[0] == 200
    assert raw(port, "GET", "/api/runs")[0] == 200  # Authorization: token ...


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil"])
def test_a_forged_host_is_refused_even_with_the_token(server, host):
    """DNS rebinding: a page on another name that resolves to 127.0.0.1 sends its own Host."""
    status, _, body = raw(server[1], "GET", "/api/runs", {"host": host})
    assert status == 403 and b"not one this dashboard answers to" in body
    assert raw(server[1], "GET", "/api/runs", {"host": f"localhost:{server[1]}"})[0] == 200


def test_posts_are_json_from_the_pages_own_origin_and_bounded(server):
    port = server[1]
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    status, _, body = post_json(port, "/api/chat/hello", chat, {"origin": "http://evil.example"})
    assert status == 403 and b"not from this dashboard's own pages" in body
    # A cross-origin form or `text/plain` fetch needs no preflight: refused for its content type.
    status, _, body = raw(port, "POST", "/api/chat/hello", {"content-type": "text/plain"}, json.dumps(chat).encode())
    assert status == 415 and b"must be JSON" in body
    status, _, body = post_json(port, "/api/chat/hello", b"{}", {"content-length": str(2 << 20)})  # claimed, not sent
    assert status == 413 and b"more than the" in body
    status, _, body = post_json(port, "/api/chat/hello", chat, {"origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and body  # its own origin: answered


def test_security_headers_on_every_response(server):
    for path in ("/", "/api/runs", "/files/tiny/config.yaml", "/static/app.js", "/run/nope"):
        _, headers, _ = raw(server[1], "GET", path)
        assert headers["x-content-type-options"] == "nosniff", path
        assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in \
            headers["content-security-policy"], path
        assert headers["x-frame-options"] == "DENY"


def test_pages_carry_no_inline_script(server):
    for path in ("/", "/run/tiny", "/compare?run=tiny&run=tiny-fast", "/chat/hello", "/data/tiny", "/run/nope"):
        _, _, body = raw(server[1], "GET", path)
        html = body.decode()
        assert html.count("<script") == html.count("<script src="), path


def hostile_run(runs_root: Path, name: str, summary: dict | None = None, config: str | None = None) -> Path:
    run = runs_root / name
    shutil.copytree(runs_root / "tiny", run, ignore=shutil.ignore_patterns("final", "link-out", "checkpoints"))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (run / "config.yaml").write_text(config)
    return run


SCRIPTED = '<img src=x onerror="window.pwned=1">'


def test_run_names_reports_and_values_are_shown_as_text_in_the_browser(server, runs_root, tab):
    url = server[0]
    made = [hostile_run(runs_root, SCRIPTED, {"steps": SCRIPTED, "metric": SCRIPTED, "scores": {"base": SCRIPTED},
                                              "stopped": "completed", "seconds": "abc"}),
            hostile_run(runs_root, "peft-string", config="peft: lora\nmodel: {name: x}\n")]
    (made[0] / "report.md").write_text(f"# report\n\n{SCRIPTED} <script>window.pwned=2</script>\n")
    ckpt = made[0] / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": SCRIPTED, "best_eval": SCRIPTED}))
    try:
        tab.goto(url + "/")
        row = tab.locator(f"tr[data-run='{SCRIPTED}']")
        assert SCRIPTED in row.inner_text()  # the name and values, as text
        assert tab.locator("tr[data-run='peft-string'] td.status").inner_text().startswith("unreadable")
        tab.goto(url + "/run/" + quote(SCRIPTED))
        assert SCRIPTED in tab.locator("main > h1").inner_text()
        assert "<script>window.pwned=2</script>" in tab.locator(".report").inner_text()
        assert SCRIPTED in tab.locator("table").last.inner_text()  # the checkpoint's meta.json
        for path in ("/run/x%2F%3C%2Fscript%3E%3Cscript%3Ewindow.pwned%3D3%3C%2Fscript%3E",
                     "/compare?run=%3C%2Fscript%3E%3Cscript%3Ewindow.pwned%3D4%3C%2Fscript%3E&run=tiny",
                     "/chat/%3C%2Fscript%3E%3Cscript%3Ewindow.pwned%3D5%3C%2Fscript%3E", "/chat/" + quote(SCRIPTED)):
            tab.goto(url + path)
        tab.goto(url + "/")
        assert tab.evaluate("window.pwned") is None
    finally:
        for run in made:
            shutil.rmtree(run)


def test_an_rl_runs_samples_are_shown_as_text(server, runs_root, tab):
    """task: rl's samples.jsonl: the last eval's prompts, replies and rewards on the run page, every
    value as text (a reply is model output: it may hold markup)."""
    run = hostile_run(runs_root, "rl-samples")
    lines = [{"label": "base", "step": 0, "prompt": "old", "completion": "old reply", "reward": 0.0},
             {"label": "eval", "step": 4, "prompt": [{"role": "user", "content": "What is 2+2?"}],
              "completion": f"4 {SCRIPTED}", "reward": 1.0}, "not json"]
    (run / "samples.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    try:
        tab.goto(server[0] + "/run/rl-samples")
        table = tab.locator("#samples")
        assert "What is 2+2?" in table.inner_text() and SCRIPTED in table.inner_text()
        assert "old reply" not in table.inner_text()  # the last eval only
        assert "step 4" in tab.locator("h2", has_text="Samples").inner_text()
        assert tab.evaluate("window.pwned") is None
    finally:
        shutil.rmtree(run)


def test_one_broken_run_does_not_break_the_table(server, runs_root):
    made = [hostile_run(runs_root, "bad-seconds", {"seconds": "abc", "steps": [1], "eval_loss": "x"}),
            hostile_run(runs_root, "bad-config", config="peft: lora\n"),
            hostile_run(runs_root, "bad-json", config="{{{\n")]
    (made[2] / "summary.json").write_text("{not json")
    try:
        for path in ("/", "/api/runs"):
            status, _, body = raw(server[1], "GET", path)
            assert status == 200, (path, body[:300])
        rows = {r["name"]: r for r in json.loads(raw(server[1], "GET", "/api/runs")[2])}
        assert rows["bad-config"]["status"] == "unreadable" and rows["bad-config"]["why"].startswith("unreadable: ")
        assert rows["tiny"]["status"] == "completed"
    finally:
        for run in made:
            shutil.rmtree(run)


@pytest.mark.parametrize("path", ["/api/metrics/tiny?offset=999999999999999999999999", "/api/metrics/tiny?offset=-1",
                                  "/api/metrics/tiny?offset=abc", "/data/tiny?n=abc", "/data/tiny?n=100000"])
def test_bad_parameters_get_400(server, path):
    assert raw_get(server[1], path) == 400


@pytest.mark.parametrize("path", ["/run/" + "x" * 300, "/files/" + "y/" * 150 + "z", "/run/tiny/", "/run/./tiny",
                                  "/run/tiny//", "/files/tiny/.sftkit-run", "/files/tiny/./config.yaml",
                                  "/files/tiny//config.yaml"])
def test_odd_paths_and_hidden_files_are_not_found(server, path):
    assert raw_get(server[1], path) == 404


def test_files_serve_images_inline_text_as_plain_text_and_the_rest_as_downloads(server, runs_root):
    run = runs_root / "tiny"
    (run / "page.html").write_text("<script>alert(1)</script>")
    (run / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>')
    (run / "blob.bin").write_bytes(bytes(range(256)))
    (run / ".hidden").mkdir(exist_ok=True)
    (run / ".hidden" / "x.txt").write_text("secret")
    try:
        for name, want in (("page.html", "text/plain"), ("drawing.svg", "text/plain"), ("plots/loss.png", "image/png")):
            status, headers, _ = raw(server[1], "GET", f"/files/tiny/{name}")
            assert status == 200 and headers["content-type"].startswith(want) and \
                "attachment" not in headers.get("content-disposition", ""), name
        status, headers, _ = raw(server[1], "GET", "/files/tiny/blob.bin")
        assert status == 200 and headers["content-disposition"].startswith("attachment")
        assert raw_get(server[1], "/files/tiny/.hidden/x.txt") == 404
    finally:
        for name in ("page.html", "drawing.svg", "blob.bin"):
            (run / name).unlink()
        shutil.rmtree(run / ".hidden")


def test_a_chat_to_a_run_without_a_final_model_answers_with_the_error(server):
    status, _, body = post_json(server[1], "/api/chat/broken", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 409 and "no final model" in json.loads(body)["error"]
    status, _, body = post_json(server[1], "/api/chat/hello", {"messages": [{"role": "user", "content": "hi"}],
                                                                "max_new_tokens": 1e999})
    assert status == 400
    status, _, body = post_json(server[1], "/api/chat/hello", {"messages": [{"role": "user", "content": "word " * 600}]})
    assert status == 400 and "positions the model takes" in json.loads(body)["error"]


def slow_chat_model(server, delay: float = 0.02):
    """Load the `tiny` run's model into the dashboard and make each generated token take `delay` s, so a
    reply lasts long enough to leave in the middle of it."""
    import torch

    status, _, _ = post_json(server[1], "/api/chat/tiny", {"messages": [{"role": "user", "content": "hi"}],
                                                            "max_new_tokens": 2})
    assert status == 200
    deadline = time.time() + 10
    while server[2].chat_lock.locked() and time.time() < deadline:
        time.sleep(0.05)
    model = server[2].chat_model[1][0]
    return model.register_forward_pre_hook(lambda *a: time.sleep(delay) or None), torch


def test_a_client_that_leaves_mid_reply_stops_the_generation_and_frees_the_dashboard(server):
    hook, _ = slow_chat_model(server)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server[1], timeout=30)
        conn.request("POST", "/api/chat/tiny", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                           "max_new_tokens": 400}),
                     {"content-type": "application/json", **AUTH})
        response = conn.getresponse()
        assert response.status == 200
        response.read1(1)  # the reply has begun: ~400 tokens x 20 ms are to come
        # While it generates: other chats are told the model is busy, and the pages answer.
        status, headers, _ = post_json(server[1], "/api/chat/tiny", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 429 and headers["retry-after"]
        t0 = time.time()
        assert raw_get(server[1], "/api/runs") == 200 and time.time() - t0 < 5
        conn.sock.close()  # the client leaves
        conn.close()
        t0 = time.time()
        while server[2].chat_lock.locked() and time.time() - t0 < 20:
            time.sleep(0.05)
        assert not server[2].chat_lock.locked(), "the generation went on after the client left"
        assert time.time() - t0 < 4  # stopped at the next tokens, not after the other ~8 s of them
        status, _, _ = post_json(server[1], "/api/chat/tiny", {"messages": [{"role": "user", "content": "hi"}],
                                                                "max_new_tokens": 2})
        assert status == 200
    finally:
        hook.remove()


def test_sigterm_stops_the_server_with_a_chat_in_flight(runs_root, tmp_path):
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sftkit", "ui", str(runs_root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        token = line.split("?token=")[1].split()[0]
        assert "at http://127.0.0.1:" in line
        deadline = time.time() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", "/api/chat/tiny", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                                   "max_new_tokens": 400}),
                             {"content-type": "application/json", "authorization": f"token {token}"})
                break
            except ConnectionRefusedError:
                assert time.time() < deadline
                time.sleep(0.2)
        response = conn.getresponse()
        assert response.status == 200
        response.read1(1)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down, then raises the signal again so the exit status says SIGTERM.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert time.time() - t0 < 15 and "Traceback" not in out, out
    finally:
        proc.kill()
        proc.wait()


def test_the_printed_address_carries_a_fresh_token_and_no_token_warns(runs_root, capsys, monkeypatch):
    import uvicorn

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append((app, kw)))
    assert main(["ui", str(runs_root), "--port", str(free_port())]) == 0
    assert main(["ui", str(runs_root), "--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    tokens = [line.split("?token=")[1].split()[0] for line in out.splitlines() if "?token=" in line]
    assert len(tokens) == 2 and tokens[0] != tokens[1] and len(tokens[0]) >= 24
    assert seen[0][0].token == tokens[0] and seen[0][1]["timeout_graceful_shutdown"] <= 5
    assert main(["ui", str(runs_root), "--port", str(free_port()), "--no-token"]) == 0
    out = capsys.readouterr().out
    assert "?token=" not in out and "--no-token: any program or web page on this machine" in out
    assert seen[-1][0].token is None
    assert main(["ui", str(runs_root), "--port", str(free_port()), "--host", "0.0.0.0"]) == 0
    assert "warning: bound to 0.0.0.0, not to this machine alone" in capsys.readouterr().out


# -- the Review page: candidates from `sftkit generate --n`, judged by people ------------------------
ODD = "<script>window.__rv=1</script><img src=x onerror=window.__rv=2>"


@pytest.fixture(scope="module")
def candidates(runs_root, tiny_model_dir):
    prompts = write_jsonl(runs_root.parent / "review-prompts.jsonl", [
        {"id": "q1", "prompt": "Say hello in French."}, {"id": "q2", "prompt": f"Repeat this: {ODD}"},
        {"id": "q3", "prompt": "Name a prime number."}])
    folder = runs_root / "review"
    folder.mkdir()
    out = folder / "candidates.jsonl"
    assert main(["generate", str(tiny_model_dir), "--input", str(prompts), "--output", str(out), "--n", "3",
                 "--temperature", "0.8", "--max-new-tokens", "5"]) == 0
    rows = [json.loads(x) for x in open(out)]
    rows[1]["candidates"][0]["reply"] = ODD  # a reply with markup in it: shown as text
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def start(tab, url: str, name: str) -> None:
    tab.goto(url + "/review/review/candidates.jsonl")
    tab.fill("#reviewer", name)
    tab.click("#who button")
    wait_until(tab, "!document.getElementById('review').hidden")
    tab.locator("#prompt").click()  # focus out of the name field: the keys are the page's


def test_a_whole_review_by_keys_continues_after_a_reload_and_two_reviewers_agree_or_not(
        server, candidates, browser, tmp_path):
    url = server[0]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.goto(url + f"/?token={TOKEN}")
    tab.click("nav a[href='/review']")
    tab.click("#files a")
    tab.fill("#reviewer", "ana")
    tab.click("#who button")
    wait_until(tab, "!document.getElementById('review').hidden")
    tab.locator("#prompt").click()
    assert tab.locator("#prompt").inner_text() == "Say hello in French."
    assert tab.locator(".reply").count() == 3 and "ana" in tab.locator("#count").inner_text()
    for keys in (["5", "Shift+Digit1", "r", "4", "o"], ["ArrowRight", "3", "Shift+Digit2"], ["ArrowRight", "1", "f"]):
        for k in keys:
            tab.keyboard.press(k)
    tab.fill("#comment", "the first is best")
    tab.locator("#prompt").click()
    tab.keyboard.press("Enter")
    wait_until(tab, "document.getElementById('saved').textContent.startsWith('saved q1')")
    assert tab.locator("#prompt").inner_text() == f"Repeat this: {ODD}"  # on to the next prompt, as text
    assert tab.locator(".reply pre").first.inner_text() == ODD
    assert tab.locator("#review script, #review img").count() == 0 and tab.evaluate("window.__rv") is None
    shot(tab, "ui-review.png", tmp_path)

    tab.reload()  # closing the page loses nothing: it goes on where ana stopped
    tab.click("#who button")  # the name is remembered
    wait_until(tab, "!document.getElementById('review').hidden")
    assert tab.locator("#prompt").inner_text().startswith("Repeat this:")
    assert tab.locator("#progress").evaluate("p => p.value") == 1
    tab.locator("#back").click()  # the saved judgement comes back with the prompt
    assert tab.locator(".reply").first.locator(".rank").input_value() == "1"
    assert tab.locator(".reply").nth(2).locator(".flag[data-flag='wrong']").is_checked()
    context.close()

    other = browser.new_context()
    tab = other.new_page()
    tab.goto(url + f"/?token={TOKEN}")
    start(tab, url, "bo")
    for k in ["2", "ArrowRight", "4", "ArrowRight", "1"]:
        tab.keyboard.press(k)
    tab.keyboard.press("Enter")
    wait_until(tab, "document.getElementById('agreement').textContent.includes(\"Krippendorff's alpha\")")
    assert "q1" in tab.locator("#agreement").inner_text()  # the prompt they disagree on
    other.close()

    reviews = candidates.parent / "reviews.jsonl"
    judged = {(j.reviewer, j.prompt_id): j for j in read_reviews(reviews)}
    ana, bo = judged[("ana", "q1")], judged[("bo", "q1")]
    ids = [c["id"] for c in json.loads(candidates.read_text().splitlines()[0])["candidates"]]
    assert ana.grades == {ids[0]: {"overall": 5, "relevance": 4}, ids[1]: {"overall": 3}, ids[2]: {"overall": 1}}
    assert ana.ranking == [[ids[0]], [ids[1]]] and ana.flags == {ids[2]: ["wrong"]}
    assert ana.comment == "the first is best" and bo.grades[ids[1]] == {"overall": 4}
    rows, stats = review_pairs(reviews)
    pairs = {(r["chosen_id"], r["rejected_id"]) for r in rows}
    assert (ids[0], ids[2]) in pairs and (ids[1], ids[2]) in pairs  # the flagged reply is never chosen
    assert stats.counts["conflicting pairs (reviewers disagree on the order)"] == 1  # ana: A > B, bo: B > A
    assert main(["data", "pairs", str(reviews), "--out", str(tmp_path / "pairs.jsonl")]) == 0


def test_the_review_api_writes_only_the_file_beside_the_candidates_and_checks_what_it_is_given(server, candidates):
    import httpx

    url, _, _ = server
    api = url + "/api/review/review/candidates.jsonl"
    post = {**AUTH, "content-type": "application/json", "origin": url}
    ok = {"reviewer": "cy", "prompt_id": "q3", "grades": {}, "ranking": [], "flags": {}}
    assert httpx.post(api, json=ok, headers=post).status_code == 200
    bad = [({**ok, "prompt_id": "q9"}, "not in candidates.jsonl"),
           ({**ok, "grades": {"q3-c0": {"overall": 7}}}, "expected a whole number 1-5"),
           ({**ok, "ranking": [["q1-c0"]]}, "is not a candidate of prompt 'q3'"),
           ({**ok, "reviewer": ""}, "reviewer")]
    for body, why in bad:
        r = httpx.post(api, json=body, headers=post)
        assert r.status_code == 400 and why in r.json()["error"], r.text
    assert httpx.post(api, json=ok, headers={**post, "origin": "http://evil.example"}).status_code == 403
    assert httpx.post(api, json=ok, headers={"content-type": "application/json", "origin": url}).status_code == 403
    assert httpx.post(api, json=ok, headers={**post, "host": "evil.example"}).status_code == 403
    for path in ("/api/review/../secret.txt", "/api/review/tiny/config.yaml", "/api/review/review/reviews.jsonl"):
        assert httpx.post(url + path, json=ok, headers=post).status_code == 404
    lines = (candidates.parent / "reviews.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["reviewer"] == "cy" for x in lines) == 1  # only the good one was written


def test_every_judgement_made_before_a_kill_9_is_on_disk(runs_root, candidates):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sftkit", "ui", str(runs_root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reviews = candidates.parent / "reviews.jsonl"
    before = len(reviews.read_text().splitlines()) if reviews.exists() else 0
    try:
        token = proc.stdout.readline().split("?token=")[1].split()[0]
        deadline = time.time() + 30
        made = 0
        while made < 20:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                body = {"reviewer": f"k{made % 3}", "prompt_id": f"q{made % 3 + 1}",
                        "grades": {f"q{made % 3 + 1}-c0": {"overall": made % 5 + 1}}}
                conn.request("POST", "/api/review/review/candidates.jsonl", json.dumps(body),
                             {"content-type": "application/json", "authorization": f"token {token}"})
                assert conn.getresponse().status == 200
                made += 1
            except ConnectionRefusedError:
                assert time.time() < deadline
                time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # no shutdown at all: what was answered must be on disk
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    lines = reviews.read_text().splitlines()
    assert len(lines) - before == 20 and all(json.loads(x)["candidates"] == "candidates.jsonl" for x in lines)
    last = [json.loads(x) for x in lines[-20:]]
    assert [x["grades"] for x in last] == [{f"q{i % 3 + 1}-c0": {"overall": i % 5 + 1}} for i in range(20)]
