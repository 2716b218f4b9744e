"""The dashboard's web app (Starlette): pages rendered on the server, curves drawn in the page by the
vendored uPlot from the JSON API, which follows metrics.jsonl as it grows."""

from __future__ import annotations

import html
import json
import threading
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import runs as R

STATIC = Path(__file__).parent / "static"
e = html.escape


def page(title: str, body: str, script: str = "", status: int = 200) -> HTMLResponse:
    return HTMLResponse(status_code=status, content=f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{e(title)} · sftkit</title><link rel="stylesheet" href="/static/vendor/uPlot.min.css">
<link rel="stylesheet" href="/static/style.css"></head><body>
<nav><a href="/" class="brand">sftkit</a> <a href="/">Runs</a></nav><main>{body}</main>
<script src="/static/vendor/uPlot.iife.min.js"></script><script src="/static/app.js"></script>
<script>{script}</script></body></html>""")


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return e(str(v))


def duration(seconds) -> str:
    if seconds is None:
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
    return f"/{path}/{quote(name)}"


class Dashboard:
    """Routes over one runs folder. Chat models are loaded on first use and kept (one at a time)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.chat_lock = threading.Lock()
        self.chat_model: tuple[str, object] | None = None
        self.data_cache: dict[tuple[str, float], dict] = {}

    # -- helpers -------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        path = R.inside(self.root, name)
        if path is None or path == self.root.resolve() or not R.is_run(path):
            raise HTTPException(404, f"no run {name!r} in {self.root}")
        return path

    # -- pages ---------------------------------------------------------------------------------
    def runs_page(self, request: Request) -> HTMLResponse:
        rows = [R.summarise(self.root, n) for n in R.find_runs(self.root)]
        head = ("<tr><th></th><th>run</th><th>task</th><th>method</th><th>model</th><th>steps</th><th>final eval loss</th>"
                "<th>best eval loss</th><th>metric: base → tuned</th><th>forgetting</th><th>duration</th><th>status</th></tr>")
        body = []
        for r in rows:
            metric = "–"
            if r["metric"]:
                metric = f"{e(r['metric'])}: {fmt(r['base'], 3)} → {fmt(r['tuned'], 3)}"
            forgetting = f"{r['forgetting']:+.1%}" if isinstance(r["forgetting"], (int, float)) else "–"
            body.append(
                f"<tr data-run=\"{e(r['name'])}\"><td><input type=checkbox class=pick value=\"{e(r['name'])}\"></td>"
                f"<td><a href=\"{run_link(r['name'])}\">{e(r['name'])}</a></td><td>{e(r['task'])}</td>"
                f"<td>{e(str(r['method']))}</td><td>{e(str(r['model']))}</td><td>{r['steps']}</td>"
                f"<td>{fmt(r['final_eval_loss'])}</td><td>{fmt(r['best_eval_loss'])}</td><td>{metric}</td>"
                f"<td>{forgetting}</td><td>{duration(r['seconds'])}</td>"
                f"<td class=\"status {r['status']}\" title=\"{e(r['why'])}\">{r['status']}"
                + (f"<div class=why>{e(r['why'][:160])}</div>" if r["why"] else "") + "</td></tr>")
        table = (f"<table id=runs>{head}{''.join(body)}</table>"
                 "<p><button id=compare>Compare the ticked runs</button></p>") if rows else (
            f"<p class=empty>No runs in {e(str(self.root))} yet: <code>sftkit train CONFIG</code> writes one.</p>")
        return page("Runs", f"<h1>Runs <small>{e(str(self.root))}</small></h1>{table}", "sftkit.runsPage();")

    def run_page(self, request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        run = self.run_dir(name)
        info = R.summarise(self.root, name)
        config = (run / "config.yaml").read_text(encoding="utf-8", errors="replace") if (run / "config.yaml").is_file() else ""
        parts = [f"<h1>{e(name)} <span class=\"status {info['status']}\" id=status>{info['status']}</span></h1>",
                 f"<p class=why>{e(info['why'])}</p>" if info["why"] else "",
                 f"<p><a href=\"{run_link(name, 'data')}\">Data</a> · <a href=\"{run_link(name, 'chat')}\">Chat</a></p>",
                 "<h2>Curves</h2><div id=charts class=charts></div>"]
        report = run / "report.md"
        text = report.read_text(encoding="utf-8", errors="replace") if report.is_file() else ""
        if text:
            parts.append(f"<h2>Report</h2><div class=report>{render_markdown(text, name)}</div>")
        images = [p for p in ("compare.png", "confusion.png", "plots/loss.png") if (run / p).is_file() and f"]({p})" not in text]
        for img in images:
            parts.append(f"<h2>{e(img)}</h2><img class=plot alt=\"{e(img)}\" src=\"/files/{quote(name)}/{quote(img)}\">")
        ckpts = R.checkpoints(run)
        if ckpts:
            parts.append("<h2>Checkpoints</h2><table><tr><th>checkpoint</th><th>step</th><th>best eval so far</th></tr>"
                         + "".join(f"<tr><td>{e(c['name'])}</td><td>{c['step']}</td><td>{fmt(c['best_eval'])}</td></tr>"
                                   for c in ckpts) + "</table>")
        final = run / "final"
        if final.is_dir():
            parts.append("<h2>Final model</h2><ul>" + "".join(
                f"<li>{e(p.name)}/</li>" for p in sorted(final.iterdir()) if p.is_dir()) + "</ul>")
        parts.append(f"<h2>Config</h2><pre id=config>{e(config)}</pre>")
        return page(name, "".join(parts), f"sftkit.runPage({json.dumps(name)});")

    def compare_page(self, request: Request) -> HTMLResponse:
        names = request.query_params.getlist("run")
        if len(names) < 2:
            return page("Compare", "<h1>Compare</h1><p>Tick two or more runs on the <a href=/>runs page</a>.</p>")
        configs = {n: R.read_config(self.run_dir(n)) for n in names}
        diff = R.config_diff(configs)
        head = "<tr><th>key</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"
        rows = "".join(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{e(json.dumps(v))}</td>" for v in vals) + "</tr>"
                       for k, vals in diff)
        table = f"<table id=diff>{head}{rows}</table>" if diff else "<p>The configs are the same.</p>"
        body = (f"<h1>Compare {len(names)} runs</h1><div id=charts class=charts></div>"
                f"<h2>Config differences</h2>{table}")
        return page("Compare", body, f"sftkit.comparePage({json.dumps(names)});")

    def data_page(self, request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        run = self.run_dir(name)
        try:
            n = max(1, min(int(request.query_params.get("n", 5)), 100))
        except ValueError:
            n = 5
        try:
            view = self.data_view(run, n)
        except Exception as err:  # the run's data moved, a bad row, a tokenizer that cannot load: say which
            return page(f"data · {name}", f"<h1>Data of {e(name)}</h1><p class=error>{e(type(err).__name__)}: {e(str(err))}</p>")
        parts = [f"<h1>Data of <a href=\"{run_link(name)}\">{e(name)}</a></h1>",
                 "<p class=legend><span class=\"tok t\">trained</span> <span class=\"tok u\">not trained</span> "
                 "— each token as the trainer sees it, rendered with the run's template</p>",
                 "<h2>Statistics</h2><pre id=stats>" + e("\n".join(view["stats"])) + "</pre>"]
        for ex in view["samples"]:
            spans = "".join(f"<span class=\"tok {'t' if t else 'u'}\" data-id=\"{i}\">{e(text)}</span>"
                            for i, t, text in ex["tokens"])
            parts.append(f"<h3>{e(ex['where'])} — {len(ex['tokens'])} tokens, {ex['trained']} trained</h3>"
                         f"<div class=sample data-index=\"{ex['index']}\">{spans}</div>")
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
        `data clean` would remove, for the run's own config (cached until config.yaml changes)."""
        key = (str(run), (run / "config.yaml").stat().st_mtime, n)
        if key in self.data_cache:
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
        return page(f"chat · {name}", body, f"sftkit.chatPage({json.dumps(name)});")

    # -- API -----------------------------------------------------------------------------------
    def api_runs(self, request: Request) -> JSONResponse:
        return JSONResponse([R.summarise(self.root, n) for n in R.find_runs(self.root)])

    def api_metrics(self, request: Request) -> JSONResponse:
        run = self.run_dir(request.path_params["name"])
        try:
            offset = max(0, int(request.query_params.get("offset", 0)))
        except ValueError:
            offset = 0
        records, end = R.read_metrics(run, offset)
        state, why = R.status(run)
        for r in records:
            if r.get("tokens") and r.get("step_seconds"):
                r["tokens_per_s"] = r["tokens"] / r["step_seconds"]
        return JSONResponse({"records": records, "offset": end, "status": state, "why": why})

    def files(self, request: Request) -> Response:
        path = R.inside(self.root, request.path_params["path"])
        if path is None or not path.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(path)

    async def api_chat(self, request: Request) -> Response:
        name = request.path_params["name"]
        run = self.run_dir(name)
        try:
            body = await request.json()
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in body["messages"]]
            system = str(body.get("system") or "").strip()
            max_new = max(1, min(int(body.get("max_new_tokens", 256)), 1024))
        except (ValueError, KeyError, TypeError, AttributeError):
            return JSONResponse({"error": "expected {\"messages\": [{\"role\", \"content\"}, ...], \"system\": ...}"}, 400)
        if not messages or messages[-1]["role"] != "user":
            return JSONResponse({"error": "the conversation must end with a user message"}, 400)
        return StreamingResponse(self.reply(run, name, system, messages, max_new), media_type="text/plain; charset=utf-8")

    def reply(self, run: Path, name: str, system: str, messages: list[dict], max_new: int):
        """Streams the model's reply; one generation at a time (a 2-core machine has no room for two)."""
        from threading import Thread

        import torch
        from transformers import TextIteratorStreamer

        from ..data import renderer_for
        from ..generate import load_for_inference

        with self.chat_lock:
            if self.chat_model is None or self.chat_model[0] != str(run):
                self.chat_model = None
                self.chat_model = (str(run), load_for_inference(str(run)))
            model, tok, data_cfg = self.chat_model[1]
            renderer = renderer_for(data_cfg, tok)
            msgs = ([{"role": "system", "content": system}] if system else []) + messages
            ids = torch.tensor([renderer.prompt_ids(msgs)], device=next(model.parameters()).device)
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            worker = Thread(target=model.generate, kwargs=dict(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                temperature=None, top_p=None, top_k=None, eos_token_id=sorted(renderer.end_ids),
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, streamer=streamer))
            worker.start()
            yield from streamer
            worker.join()


def create_app(root: str | Path) -> Starlette:
    d = Dashboard(Path(root))

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/api/", "/files/")):
            return JSONResponse({"error": exc.detail}, exc.status_code)
        return page("Not found", f"<h1>{exc.status_code}</h1><p>{e(str(exc.detail))}</p>", status=exc.status_code)

    routes = [
        Route("/", d.runs_page),
        Route("/run/{name:path}", d.run_page),
        Route("/compare", d.compare_page),
        Route("/data/{name:path}", d.data_page),
        Route("/chat/{name:path}", d.chat_page),
        Route("/api/runs", d.api_runs),
        Route("/api/metrics/{name:path}", d.api_metrics),
        Route("/api/chat/{name:path}", d.api_chat, methods=["POST"]),
        Route("/files/{path:path}", d.files),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})

