"""The dashboard's web app (Starlette): pages rendered on the server, curves drawn in the page by the
vendored uPlot from the JSON API, which follows metrics.jsonl as it grows.

It is a local server, guarded as Jupyter guards its own (docs/security.md): a launch token on every
request, a Host allow-list against DNS rebinding, POSTs only as JSON from the page's own origin and
of bounded size, and a Content-Security-Policy that runs no script but the dashboard's own file.
Whatever it shows from data, configs, run names or reports is escaped text, never markup.
"""

from __future__ import annotations

import contextlib
import html
import json
import posixpath
import queue
import secrets
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import runs as R

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "sftkit_token"
MAX_BODY = 1 << 20  # bytes a POST may carry: a chat is a few kB
LOOPBACK = ("localhost", "127.0.0.1", "::1")
IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
DATA_CACHE = 8  # data views kept (each a tokenized copy of a run's samples)
CHAT_STALL = 120.0  # seconds a reply may go without a new token before the request gives up
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def e(value) -> str:
    """Any value as HTML text: markup in it is shown, never parsed."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, kind: str = "", args=None, status: int = 200) -> HTMLResponse:
    """A page; what its script needs comes as escaped data on <body>, read by app.js (no inline script)."""
    data = f' data-page="{e(kind)}" data-args="{e(json.dumps(args))}"' if kind else ""
    return HTMLResponse(status_code=status, content=f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{e(title)} · sftkit</title><link rel="stylesheet" href="/static/vendor/uPlot.min.css">
<link rel="stylesheet" href="/static/style.css"></head><body{data}>
<nav><a href="/" class="brand">sftkit</a> <a href="/">Runs</a> <a href="/review">Review</a></nav><main>{body}</main>
<script src="/static/vendor/uPlot.iife.min.js"></script><script src="/static/app.js"></script></body></html>""")


COSTS = ("prompt_tokens", "seconds_per_answer")  # what compare measures beside the scores, shown last


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return e(v)


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < 1e9:
        return "–"
    s = int(seconds)
    return f"{s // 3600}h {s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def render_markdown(text: str, run_name: str) -> str:
    """report.md as HTML (raw HTML in it is escaped); its relative image links point into the run."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for t in tokens:
        for child in t.children or []:
            src = child.attrGet("src") if child.type == "image" else None
            if src and "://" not in src and not src.startswith("/"):
                child.attrSet("src", f"/files/{quote(run_name)}/{quote(src)}")
    return md.renderer.render(tokens, md.options, {})


def run_link(name: str, path: str = "run") -> str:
    return e(f"/{path}/{quote(name)}")


def plain_name(name: str) -> bool:
    """A run name as the runs table writes it: relative, in normal form, no hidden part."""
    return bool(name) and "\\" not in name and "\x00" not in name and posixpath.normpath(name) == name \
        and not name.startswith("/") and not any(part.startswith(".") for part in name.split("/"))


def bad_request(why: str) -> JSONResponse:
    return JSONResponse({"error": why}, 400)


def query_int(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"{key}: expected a whole number, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise HTTPException(400, f"{key}: {value} is outside {lo}..{hi}")
    return value


def is_text(path: Path, probe: int = 8192) -> bool:
    """UTF-8 without NUL bytes in its first `probe` bytes (a character cut at the end still counts)."""
    with open(path, "rb") as f:
        head = f.read(probe)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return len(head) == probe and err.start >= probe - 3
    return True


def unreadable(name: str, err: Exception) -> dict:
    return {"name": name, "task": "–", "method": "–", "model": "–", "steps": None, "final_eval_loss": None,
            "best_eval_loss": None, "metric": None, "base": None, "tuned": None, "forgetting": None,
            "seconds": None, "status": "unreadable", "why": f"unreadable: {type(err).__name__}: {err}"[:300]}


def summary_row(root: Path, name: str) -> dict:
    """One row of the runs table; a run whose files cannot be read is a row that says why."""
    try:
        return R.summarise(root, name)
    except Exception as err:  # noqa: BLE001 - one broken run must not take the table down
        return unreadable(name, err)


class Guard:
    """ASGI middleware in front of every route: the Host allow-list, the launch token (query, cookie
    or `Authorization: token ...`), JSON-only same-origin POSTs with a size cap, security headers."""

    def __init__(self, app, token: str | None, hosts: set[str]):
        self.app, self.token, self.hosts = app, token, {h.strip("[]").lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal, set_cookie = self.refusal(scope, headers)
        if refusal is not None:
            status, why = refusal
            response = PlainTextResponse(f"{status}: {why}\n", status)
            return await response(scope, receive, self.with_headers(send, None))
        await self.app(scope, receive, self.with_headers(send, set_cookie))

    def refusal(self, scope, headers: dict) -> tuple[tuple[int, str] | None, str | None]:
        host = headers.get("host", "")
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() not in self.hosts:
            return (403, f"Host {host[:100]!r} is not one this dashboard answers to (it serves "
                         f"{', '.join(sorted(self.hosts))})"), None
        set_cookie = None
        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
            cookie = next((c.split("=", 1)[1] for c in headers.get("cookie", "").split("; ")
                           if c.startswith(TOKEN_COOKIE + "=")), None)
            auth = headers.get("authorization", "")
            given = query or cookie or (auth[6:] if auth.lower().startswith("token ") else None)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                return (403, "this dashboard needs its launch token: open the address `sftkit ui` printed "
                             "(it ends in ?token=...)"), None
            if query is not None and cookie != self.token:
                set_cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        if scope["method"] not in ("GET", "HEAD"):
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return (415, "a request that changes something must be JSON (content-type: application/json)"), None
            origin = headers.get("origin")
            own = f"{scope.get('scheme', 'http')}://{host}"
            if origin is not None and origin != own:
                return (403, f"a request from {origin[:100]} is not from this dashboard's own pages ({own})"), None
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                return (411, "a request body needs its content-length"), None
            if int(length) > MAX_BODY:
                return (413, f"a request body of {int(length)} bytes is more than the {MAX_BODY} allowed"), None
        return None, set_cookie

    @staticmethod
    def with_headers(send, set_cookie: str | None):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]
                           + ([(b"set-cookie", set_cookie.encode())] if set_cookie else [])}
            await send(message)
        return wrapped


class Dashboard:
    """Routes over one runs folder. Chat models are loaded on first use and kept (one at a time)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.chat_lock = threading.Lock()  # one generation at a time: a 2-core machine has no room for two
        self.chat_model: tuple[str, object] | None = None
        self.data_cache: OrderedDict[tuple, dict] = OrderedDict()
        self.stopping = threading.Event()  # set when the server shuts down: every generation ends
        self.review_lock = threading.Lock()  # one judgement written at a time (each is one O_APPEND write too)

    # -- helpers -------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        try:
            path = R.inside(self.root, name) if plain_name(name) else None
            found = path is not None and path != self.root.resolve() and R.is_run_dir(path)
        except OSError:  # a name too long for the file system, say
            found = False
        if not found:
            raise HTTPException(404, f"no run {name[:200]!r} in {self.root}")
        return path

    # -- pages ---------------------------------------------------------------------------------
    def runs_page(self, request: Request) -> HTMLResponse:
        rows = [summary_row(self.root, n) for n in R.find_runs(self.root)]
        head = ("<tr><th></th><th>run</th><th>task</th><th>method</th><th>model</th><th>steps</th><th>final eval loss</th>"
                "<th>best eval loss</th><th>metric: base → tuned</th><th>forgetting</th><th>duration</th><th>status</th></tr>")
        body = []
        for r in rows:
            try:
                body.append(self.runs_row(r))
            except Exception as err:  # noqa: BLE001 - a value of an unexpected type: the row says so
                body.append(self.runs_row(unreadable(r["name"], err)))
        table = (f"<table id=runs>{head}{''.join(body)}</table>"
                 "<p><button id=compare>Compare the ticked runs</button></p>") if rows else (
            f"<p class=empty>No runs in {e(self.root)} yet: <code>sftkit train CONFIG</code> writes one.</p>")
        return page("Runs", f"<h1>Runs <small>{e(self.root)}</small></h1>{table}", "runs", None)

    @staticmethod
    def runs_row(r: dict) -> str:
        metric = "–"
        if r["metric"]:
            metric = f"{e(r['metric'])}: {fmt(r['base'], 3)} → {fmt(r['tuned'], 3)}"
        forgetting = f"{r['forgetting']:+.1%}" if isinstance(r["forgetting"], (int, float)) else "–"
        why = str(r["why"] or "")
        return (f"<tr data-run=\"{e(r['name'])}\"><td><input type=checkbox class=pick value=\"{e(r['name'])}\"></td>"
                f"<td><a href=\"{run_link(r['name'])}\">{e(r['name'])}</a></td><td>{e(r['task'])}</td>"
                f"<td>{e(r['method'])}</td><td>{e(r['model'])}</td><td>{fmt(r['steps'])}</td>"
                f"<td>{fmt(r['final_eval_loss'])}</td><td>{fmt(r['best_eval_loss'])}</td><td>{metric}</td>"
                f"<td>{forgetting}</td><td>{duration(r['seconds'])}</td>"
                f"<td class=\"status {e(r['status'])}\" title=\"{e(why)}\">{e(r['status'])}"
                + (f"<div class=why>{e(why[:160])}</div>" if why else "") + "</td></tr>")

    def run_page(self, request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        run = self.run_dir(name)
        info = summary_row(self.root, name)
        config = (run / "config.yaml").read_text(encoding="utf-8", errors="replace") if (run / "config.yaml").is_file() else ""
        parts = [f"<h1>{e(name)} <span class=\"status {e(info['status'])}\" id=status>{e(info['status'])}</span></h1>",
                 f"<p class=why>{e(info['why'])}</p>" if info["why"] else "",
                 f"<p><a href=\"{run_link(name, 'data')}\">Data</a> · <a href=\"{run_link(name, 'chat')}\">Chat</a>"
                 + (f" · <a id=comparison href=\"/compare?run={e(quote(name))}\">Base vs tuned vs alternatives</a>"
                    if R.comparison(run) else "") + "</p>",
                 "<h2>Curves</h2><div id=charts class=charts></div>"]
        report = run / "report.md"
        text = report.read_text(encoding="utf-8", errors="replace") if report.is_file() else ""
        if text:
            parts.append(f"<h2>Report</h2><div class=report>{render_markdown(text, name)}</div>")
        images = [p for p in ("compare.png", "confusion.png", "plots/loss.png") if (run / p).is_file() and f"]({p})" not in text]
        for img in images:
            parts.append(f"<h2>{e(img)}</h2><img class=plot alt=\"{e(img)}\" src=\"/files/{e(quote(name))}/{e(quote(img))}\">")
        samples = R.last_samples(run)
        if samples:  # task: rl: the last eval's held-out prompts, greedy replies and rewards, as text
            label, step, rows = samples
            parts.append(f"<h2>Samples ({e(label)}, step {e(str(step))})</h2><table id=samples><tr><th>prompt</th>"
                         "<th>reply</th><th>reward</th></tr>" + "".join(
                             f"<tr><td>{e(p)}</td><td><pre>{e(c)}</pre></td><td>{fmt(r)}</td></tr>" for p, c, r in rows)
                         + "</table>")
        ckpts = R.checkpoints(run)
        if ckpts:
            parts.append("<h2>Checkpoints</h2><table><tr><th>checkpoint</th><th>step</th><th>best eval so far</th></tr>"
                         + "".join(f"<tr><td>{e(c['name'])}</td><td>{fmt(c['step'])}</td><td>{fmt(c['best_eval'])}</td></tr>"
                                   for c in ckpts) + "</table>")
        final = run / "final"
        if final.is_dir():
            parts.append("<h2>Final model</h2><ul>" + "".join(
                f"<li>{e(p.name)}/</li>" for p in sorted(final.iterdir()) if p.is_dir()) + "</ul>")
        parts.append(f"<h2>Config</h2><pre id=config>{e(config)}</pre>")
        return page(name, "".join(parts), "run", name)

    def compare_page(self, request: Request) -> HTMLResponse:
        names = request.query_params.getlist("run")
        if not names:
            return page("Compare", "<h1>Compare</h1><p>Tick runs on the <a href=/>runs page</a>.</p>")
        parts = [f"<h1>Compare {len(names)} run{'s' if len(names) > 1 else ''}</h1><div id=charts class=charts></div>"]
        if len(names) > 1:
            diff = R.config_diff({n: R.read_config(self.run_dir(n)) for n in names})
            head = "<tr><th>key</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"
            rows = "".join(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{e(json.dumps(v, default=str))}</td>" for v in vals)
                           + "</tr>" for k, vals in diff)
            parts.append("<h2>Config differences</h2>" + (f"<table id=diff>{head}{rows}</table>" if diff
                                                          else "<p>The configs are the same.</p>"))
        for n in names:  # `sftkit compare`'s table: base, tuned and the alternatives (shots, retrieval), with costs
            rows = R.comparison(self.run_dir(n))
            if not rows:
                continue
            keys = list(dict.fromkeys(k for _, m in rows for k in m if k not in COSTS)) + [
                k for k in COSTS if any(k in m for _, m in rows)]
            head = "<tr><th>row</th>" + "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>"
            body = "".join(f"<tr data-row=\"{e(r)}\"><td>{e(r)}</td>" + "".join(f"<td>{fmt(m.get(k))}</td>" for k in keys)
                           + "</tr>" for r, m in rows)
            parts.append(f"<h2>Base vs tuned vs alternatives: {e(n)}</h2><table class=comparison data-run=\"{e(n)}\">"
                         f"{head}{body}</table>")
        return page("Compare", "".join(parts), "compare", names)

    def data_page(self, request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        run = self.run_dir(name)
        n = query_int(request, "n", 5, 1, 100)
        try:
            view = self.data_view(run, n)
        except Exception as err:  # noqa: BLE001 - the run's data moved, a bad row, a tokenizer that cannot load: say which
            return page(f"data · {name}", f"<h1>Data of {e(name)}</h1><p class=error>{e(type(err).__name__)}: {e(err)}</p>")
        parts = [f"<h1>Data of <a href=\"{run_link(name)}\">{e(name)}</a></h1>",
                 "<p class=legend><span class=\"tok t\">trained</span> <span class=\"tok u\">not trained</span> "
                 "— each token as the trainer sees it, rendered with the run's template</p>",
                 "<h2>Statistics</h2><pre id=stats>" + e("\n".join(view["stats"])) + "</pre>"]
        for ex in view["samples"]:
            spans = "".join(f"<span class=\"tok {'t' if t else 'u'}\" data-id=\"{e(i)}\">{e(text)}</span>"
                            for i, t, text in ex["tokens"])
            parts.append(f"<h3>{e(ex['where'])} — {len(ex['tokens'])} tokens, {e(ex['trained'])} trained</h3>"
                         f"<div class=sample data-index=\"{e(ex['index'])}\">{spans}</div>")
        parts.append("<h2>Quality findings</h2><pre id=quality>" + e(view["quality"]) + "</pre>")
        removed = view["removed"]
        parts.append(f"<h2>Rows <code>data clean</code> would remove ({len(removed)})</h2>")
        if removed:
            parts.append("<table id=removed><tr><th>row</th><th>reason</th><th>content</th></tr>" + "".join(
                f"<tr><td>{e(w)}</td><td>{e(why)}</td><td><code>{e(text[:300])}</code></td></tr>" for w, why, text in removed)
                + "</table>")
        return page(f"data · {name}", "".join(parts))

    def data_view(self, run: Path, n: int) -> dict:
        """Samples with per-token trained flags, the inspect statistics, quality findings and what
        `data clean` would remove, for the run's own config (kept for the last few runs and sizes, until
        config.yaml changes). It reads the data files and template the config names, wherever they are."""
        key = (str(run), (run / "config.yaml").stat().st_mtime, n)
        if key in self.data_cache:
            self.data_cache.move_to_end(key)
            return self.data_cache[key]
        from ..config import load_config
        from ..data import prepare, renderer_for
        from ..data.quality import CLEAN_DEFAULT, analyse, length_stats, plan_clean, quality_summary
        from ..models import load_tokenizer

        cfg = load_config(run / "config.yaml")
        if cfg.task not in ("sft",):
            raise ValueError(f"the data view shows token masks of sft runs; this run's task is {cfg.task}")
        tok = load_tokenizer(cfg.model.name, cfg.model.revision)
        prepared = prepare(cfg.data, cfg.train.seed, renderer_for(cfg.data, tok))
        stats = list(prepared.summary())
        for label, exs in (("train", prepared.train), ("eval", prepared.eval)):
            if exs:
                s = length_stats(exs)
                stats.append(f"{label} tokens per example: p50 {s['p50']}, p90 {s['p90']}, max {s['max']}; "
                             f"trained-token fraction {s['trained_fraction']:.1%}")
        samples = []
        for index, ex in enumerate(prepared.train[:n]):
            tokens = [(i, label != -100, tok.decode([i])) for i, label in zip(ex.input_ids, ex.labels)]
            samples.append({"index": index, "where": f"{ex.source}:{ex.line}", "tokens": tokens, "trained": ex.n_trained})
        q = analyse(prepared.train_rows, prepared.eval_rows, tok, cfg.data.max_length, diversity=False)
        rows, read_stats, removals = plan_clean(cfg, set(CLEAN_DEFAULT.split(",")))
        removed = [(m.split(": ", 1)[0], m.split(": ", 1)[-1], json.dumps(raw, ensure_ascii=False)) for m, raw in read_stats.invalid]
        removed += [(f"{rows[i].source}:{rows[i].line}", why, json.dumps(rows[i].raw, ensure_ascii=False))
                    for i, why in sorted(removals.items())]
        view = {"samples": samples, "stats": stats, "removed": removed,
                "quality": quality_summary(q, prepared.train_rows, prepared.eval_rows)}
        self.data_cache[key] = view
        while len(self.data_cache) > DATA_CACHE:
            self.data_cache.popitem(last=False)
        return view

    def chat_page(self, request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        run = self.run_dir(name)
        if not (run / "final" / "model").is_dir():
            return page(f"chat · {name}", f"<h1>Chat with {e(name)}</h1><p class=error>This run has no final model yet.</p>")
        system = (R.read_config(run).get("data") or {}).get("system") or ""
        body = (f"<h1>Chat with <a href=\"{run_link(name)}\">{e(name)}</a></h1>"
                f"<label>System message <input id=system value=\"{e(system)}\"></label>"
                "<div id=log class=chatlog></div><form id=chatform><input id=message autocomplete=off "
                "placeholder=\"Say something\"><button>Send</button> <button type=button id=reset>Reset</button></form>")
        return page(f"chat · {name}", body, "chat", name)

    # -- review ----------------------------------------------------------------------------------
    def candidates_file(self, rel: str) -> Path:
        """A candidates file under the runs folder (`sftkit generate --n`): a plain relative path to a
        .jsonl whose name has `candidates` in it. Its judgements go to reviews.jsonl beside it."""
        path = R.inside(self.root, rel) if plain_name(rel) else None
        if path is None or path.suffix != ".jsonl" or "candidates" not in path.name or not path.is_file():
            raise HTTPException(404, f"no candidates file {rel[:200]!r} in {self.root} (make one: sftkit generate "
                                     "RUN --input prompts.jsonl --output RUNS/review/candidates.jsonl --n 4 --temperature 0.8)")
        return path

    def review_list(self, request: Request) -> HTMLResponse:
        found = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*candidates*.jsonl")
                       if not any(x.startswith(".") for x in p.relative_to(self.root).parts))[:500]
        items = "".join(f"<li><a href=\"/review/{e(quote(f))}\">{e(f)}</a></li>" for f in found)
        body = (f"<h1>Review</h1><ul id=files>{items}</ul>" if found else
                f"<h1>Review</h1><p class=empty>No candidates files in {e(self.root)}: <code>sftkit generate RUN "
                "--input prompts.jsonl --output RUNS/review/candidates.jsonl --n 4 --temperature 0.8</code> writes one.</p>")
        return page("Review", body)

    def review_page(self, request: Request) -> HTMLResponse:
        rel = request.path_params["path"]
        self.candidates_file(rel)
        body = (f"<h1>Review <small>{e(rel)}</small></h1>"
                "<form id=who><label>Your name <input id=reviewer autocomplete=username maxlength=80 required></label> "
                "<button>Start</button></form>"
                "<div id=review hidden><p><progress id=progress max=1 value=0></progress> <span id=count></span></p>"
                "<p class=keys>Keys: ←/→ pick a reply · 1-5 its grade for <b id=criterion>overall</b> (o overall, r relevance, "
                "c coherence, a appropriateness) · shift+1-9 its rank (equal ranks tie) · "
                "f flag it wrong · u flag it unsafe · Enter save and next · s skip · p back</p>"
                "<h2>Prompt</h2><pre id=prompt></pre><div id=replies class=replies></div>"
                "<label>Comment <textarea id=comment rows=2></textarea></label>"
                "<p><button id=save>Save and next (Enter)</button> <button id=skip type=button>Skip (s)</button> "
                "<button id=back type=button>Back (p)</button> <span id=saved></span></p>"
                "<h2>Agreement</h2><pre id=agreement></pre></div>")
        return page(f"review · {rel}", body, "review", rel)

    def review_state(self, path: Path, reviewer: str) -> dict:
        from ..reviews import agreement, read_candidates, read_reviews

        rows = read_candidates(path)
        reviews = path.parent / "reviews.jsonl"
        judged = [j for j in read_reviews(reviews) if j.candidates_file == path.name] if reviews.is_file() else []
        mine = {j.prompt_id: {"grades": j.grades, "ranking": j.ranking, "flags": j.flags, "comment": j.comment}
                for j in judged if j.reviewer == reviewer}
        prompts = []
        for pid, row in rows.items():
            prompt = row.get("prompt") if "messages" not in row else "\n\n".join(
                f"{m.get('role')}: {m.get('content')}" for m in row["messages"] if isinstance(m, dict))
            # The reply alone: which model or run wrote it stays in the file, out of the reviewer's sight.
            prompts.append({"id": pid, "prompt": prompt if isinstance(prompt, str) else json.dumps(prompt),
                            "candidates": [{"id": c["id"], "reply": c["reply"]} for c in row["candidates"]]})
        text = ""
        if len({j.reviewer for j in judged}) >= 2:
            text = "\n".join(agreement(reviews).lines())
        return {"prompts": prompts, "mine": mine, "judged": len(mine), "agreement": text}

    def api_review(self, request: Request) -> JSONResponse:
        path = self.candidates_file(request.path_params["path"])
        reviewer = request.query_params.get("reviewer", "").strip()
        if not reviewer:
            return bad_request("reviewer: give your name (?reviewer=NAME)")
        try:
            return JSONResponse(self.review_state(path, reviewer))
        except ValueError as err:  # a bad line in the candidates or review file: say which
            return JSONResponse({"error": str(err)}, 409)

    async def api_review_post(self, request: Request) -> JSONResponse:
        """One judgement, appended to reviews.jsonl beside the candidates file (and nowhere else)."""
        from ..reviews import append_judgement, check_ids, judgement_of, read_candidates

        path = self.candidates_file(request.path_params["path"])
        try:
            body = json.loads(await request.body())
            reviewer = str(body["reviewer"]).strip()
            if not reviewer or len(reviewer) > 80 or not reviewer.isprintable():
                raise ValueError("reviewer: a name of 1-80 printable characters")
            line = {"reviewer": reviewer, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "candidates": path.name, "prompt_id": str(body["prompt_id"]), "grades": body.get("grades") or {},
                    "ranking": body.get("ranking") or [], "flags": body.get("flags") or {},
                    "comment": str(body.get("comment") or "")[:4000]}
            j = judgement_of(line, "judgement")
            row = read_candidates(path).get(j.prompt_id)
            if row is None:
                raise ValueError(f"prompt_id: {j.prompt_id!r} is not in {path.name}")
            check_ids(j, row, "judgement")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return bad_request(str(err) if isinstance(err, ValueError) else
                               "expected {\"reviewer\", \"prompt_id\", \"grades\", \"ranking\", \"flags\", \"comment\"}")
        with self.review_lock:
            append_judgement(path.parent / "reviews.jsonl", line)
        return JSONResponse({"saved": True, "time": line["time"]})

    # -- API -----------------------------------------------------------------------------------
    def api_runs(self, request: Request) -> JSONResponse:
        return JSONResponse([summary_row(self.root, n) for n in R.find_runs(self.root)])

    def api_metrics(self, request: Request) -> JSONResponse:
        run = self.run_dir(request.path_params["name"])
        offset = query_int(request, "offset", 0, 0, 1 << 50)
        records, end = R.read_metrics(run, offset)
        state, why = R.status(run)
        for r in records:
            if isinstance(r.get("tokens"), (int, float)) and isinstance(r.get("step_seconds"), (int, float)) \
                    and r["step_seconds"] > 0:
                r["tokens_per_s"] = r["tokens"] / r["step_seconds"]
        return JSONResponse({"records": records, "offset": end, "status": state, "why": why})

    def files(self, request: Request) -> Response:
        """A file under the runs folder: images inline, text as text/plain, anything else as a download;
        nothing hidden (a dot-file or anything in a dot-folder) is served."""
        rel = request.path_params["path"]
        try:
            path = R.inside(self.root, rel) if plain_name(rel) else None
            found = path is not None and path.is_file()
        except OSError:
            found = False
        if not found:
            raise HTTPException(404, "not found")
        kind = IMAGES.get(path.suffix.lower())
        if kind is not None:
            return FileResponse(path, media_type=kind)
        if is_text(path):
            return FileResponse(path, media_type="text/plain; charset=utf-8")
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)  # an attachment

    async def api_chat(self, request: Request) -> Response:
        name = request.path_params["name"]
        run = self.run_dir(name)
        try:
            body = json.loads(await request.body())
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in body["messages"]]
            system = str(body.get("system") or "").strip()
            max_new = max(1, min(int(body.get("max_new_tokens", 256)), 1024))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            return bad_request("expected {\"messages\": [{\"role\", \"content\"}, ...], \"system\": ..., "
                               "\"max_new_tokens\": a whole number}")
        if not messages or messages[-1]["role"] != "user" or any(m["role"] not in ("user", "assistant") for m in messages):
            return bad_request("the conversation must be user and assistant messages and end with a user message")
        if not (run / "final" / "model").is_dir():
            return JSONResponse({"error": f"run {name} has no final model yet (did it finish?)"}, 409)
        if not self.chat_lock.acquire(blocking=False):
            return JSONResponse({"error": "the model is answering another chat; try again when it is done"}, 429,
                                headers={"retry-after": "5"})
        try:
            model, tok, renderer = await anyio.to_thread.run_sync(self.chat_model_for, run)
            ids = renderer.prompt_ids(([{"role": "system", "content": system}] if system else []) + messages)
            limit = getattr(model.config, "max_position_embeddings", None)
            if isinstance(limit, int) and len(ids) + max_new > limit:
                raise ValueError(f"the conversation is {len(ids)} tokens; with max_new_tokens {max_new} that is more "
                                 f"than the {limit} positions the model takes: reset the chat or write less")
            chat = Generation(model, tok, renderer, ids, max_new, self.stopping, self.chat_lock)
        except ValueError as err:
            self.chat_lock.release()
            return bad_request(str(err))
        except Exception as err:  # noqa: BLE001 - a model that cannot load, a template that fails: say so
            self.chat_lock.release()
            return JSONResponse({"error": f"{type(err).__name__}: {err}"[:500]}, 500)
        return ChatStream(chat.pieces(request), chat.left.set)

    def chat_model_for(self, run: Path):
        from ..data import renderer_for
        from ..generate import load_for_inference

        if self.chat_model is None or self.chat_model[0] != str(run):
            self.chat_model = None
            self.chat_model = (str(run), load_for_inference(str(run)))
        model, tok, data_cfg = self.chat_model[1]
        return model, tok, renderer_for(data_cfg, tok)


class Generation:
    """One chat reply, generated in its own thread from the moment it is made. It stops at the next
    token once `left` is set (the client went away) or `stopping` is (the server stops), and the thread
    releases the chat lock when it ends, however the request ended."""

    def __init__(self, model, tok, renderer, ids: list[int], max_new: int, stopping: threading.Event,
                 lock: threading.Lock):
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        self.left, self.failure, self.tokens = threading.Event(), [], 0
        self.streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=1.0)
        ids_t = torch.tensor([ids], device=next(model.parameters()).device)
        kwargs = dict(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=max_new, do_sample=False,
                      temperature=None, top_p=None, top_k=None, eos_token_id=sorted(renderer.end_ids),
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      streamer=self.streamer, stopping_criteria=StoppingCriteriaList([self.stop_now]))
        self.stopping = stopping

        def run() -> None:
            try:
                model.generate(**kwargs)
            except BaseException as err:  # noqa: BLE001 - told to the client at the end of the reply
                self.failure.append(err)
                self.streamer.end()
            finally:
                lock.release()

        self.thread = threading.Thread(target=run, daemon=True, name="sftkit-chat")
        self.thread.start()

    def stop_now(self, input_ids, scores, **kwargs):
        import torch

        self.tokens += 1
        stop = self.left.is_set() or self.stopping.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def next_piece(self):
        """The next piece of text; "" when none came within the streamer's timeout; None at the end."""
        try:
            return next(self.streamer)
        except StopIteration:
            return None
        except queue.Empty:
            return ""

    async def pieces(self, request: Request):
        stalled = 0
        while True:
            piece = await anyio.to_thread.run_sync(self.next_piece)
            if piece is None:
                break
            if await request.is_disconnected() or self.stopping.is_set():
                self.left.set()
                return
            if piece:
                stalled = 0
                yield piece
            else:
                stalled += 1
                if stalled >= CHAT_STALL:
                    self.left.set()
                    yield f"\n[sftkit: no new token for {CHAT_STALL:.0f} s; generation stopped]"
                    return
        if self.failure:
            yield f"\n[sftkit: generation failed: {type(self.failure[0]).__name__}: {self.failure[0]}]"[:600]


class ChatStream(StreamingResponse):
    """A streamed reply that calls `on_close` however the response ends: done, cancelled, or the
    client gone mid-send."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/plain; charset=utf-8")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def allowed_hosts(host: str) -> set[str]:
    """Loopback names, and the address the server is bound to (unless it is every address)."""
    return set(LOOPBACK) | ({host} if host not in ("0.0.0.0", "::", "") else set())


def create_app(root: str | Path, token: str | None = None, hosts: set[str] | None = None) -> Guard:
    """The dashboard over `root`. `token`: the launch token every request must carry (None: none asked,
    `sftkit ui --no-token`); `hosts`: the Host names it answers to (default: loopback)."""
    d = Dashboard(Path(root))

    async def refused(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/api/", "/files/")):
            return JSONResponse({"error": exc.detail}, exc.status_code)
        return page("Not found" if exc.status_code == 404 else "Refused",
                    f"<h1>{exc.status_code}</h1><p>{e(exc.detail)}</p>", status=exc.status_code)

    routes = [
        Route("/", d.runs_page),
        Route("/run/{name:path}", d.run_page),
        Route("/compare", d.compare_page),
        Route("/data/{name:path}", d.data_page),
        Route("/chat/{name:path}", d.chat_page),
        Route("/api/runs", d.api_runs),
        Route("/api/metrics/{name:path}", d.api_metrics),
        Route("/api/chat/{name:path}", d.api_chat, methods=["POST"]),
        Route("/review", d.review_list),
        Route("/review/{path:path}", d.review_page),
        Route("/api/review/{path:path}", d.api_review, methods=["GET"]),
        Route("/api/review/{path:path}", d.api_review_post, methods=["POST"]),
        Route("/files/{path:path}", d.files),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        d.stopping.set()  # every generation still running ends at its next token

    app = Starlette(routes=routes, exception_handlers={HTTPException: refused}, lifespan=lifespan)
    guard = Guard(app, token, hosts if hosts is not None else set(LOOPBACK))
    guard.dashboard = d
    return guard
