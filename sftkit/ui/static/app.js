// sftkit dashboard: curves (uPlot, vendored), live metrics, compare, chat. No build step, no CDN.
"use strict";
const sftkit = (() => {
  const CURVES = [
    ["loss", "train loss"], ["eval_loss", "eval loss"], ["nll", "train NLL (distillation)"],
    ["distill", "distillation term"], ["reward", "reward (sampled completions)"],
    ["eval_reward", "held-out reward (greedy)"], ["eval_pass_rate", "held-out pass rate"],
    ["frac_reward_zero_std", "groups with equal rewards"], ["lr", "learning rate"],
    ["grad_norm", "grad norm"], ["tokens_per_s", "tokens/s"], ["forgetting", "forgetting (ref. perplexity rise)"],
  ];
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];

  async function fetchMetrics(name, offset) {
    const r = await fetch(`/api/metrics/${encodeURIComponent(name).replace(/%2F/g, "/")}?offset=${offset}`);
    if (!r.ok) throw new Error(`metrics of ${name}: HTTP ${r.status}`);
    return r.json();
  }

  // One chart per metric; each series is a run. x = optimizer step; missing values are gaps.
  function makeChart(el, key, title, names) {
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.metric = key;
    el.appendChild(box);
    const opts = {
      title, width: 460, height: 220, scales: { x: { time: false } },
      series: [{ label: "step" }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], spanGaps: true,
                                                           points: { show: key.startsWith("eval") || key === "forgetting" } }))],
      axes: [{ label: "step" }, { size: 70 }],
    };
    return { box, plot: new uPlot(opts, [[], ...names.map(() => [])], box), key };
  }

  function redraw(charts, runs) {
    const steps = [...new Set(runs.flatMap(r => r.records.map(x => x.step)))].sort((a, b) => a - b);
    for (const c of charts) {
      const cols = runs.map(r => {
        const by = new Map(r.records.map(x => [x.step, x[c.key]]));
        return steps.map(s => (typeof by.get(s) === "number" ? by.get(s) : null));
      });
      const has = cols.some(col => col.some(v => v !== null));
      c.box.hidden = !has;
      c.box.dataset.points = String(cols.reduce((n, col) => n + col.filter(v => v !== null).length, 0));
      if (has) c.plot.setData([steps, ...cols]);
    }
  }

  // Named eval sets (data.eval as a mapping) log eval/<set>/<metric>: one chart per such key, made
  // when it first appears. The set's name comes from a config: uPlot writes the title as text.
  const PER_SET = /^eval\/([^/]+)\/(.+)$/;
  function addSetCharts(el, charts, names, records) {
    const known = new Set(charts.map(c => c.key));
    for (const rec of records) {
      for (const k of Object.keys(rec)) {
        const m = PER_SET.exec(k);
        if (!m || known.has(k) || typeof rec[k] !== "number" || m[2] === "eval_ppl") continue;
        known.add(k);
        const metric = m[2] === "eval_loss" ? "eval loss" : m[2] === "eval_accuracy" ? "eval token accuracy" : m[2];
        charts.push(makeChart(el, k, `${metric}: set ${m[1]}`, names));
      }
    }
  }

  async function follow(names, el, onStatus) {
    const runs = names.map(n => ({ name: n, records: [], offset: 0, status: null }));
    const charts = CURVES.map(([k, t]) => makeChart(el, k, t, names));
    async function tick() {
      let changed = false;
      for (const r of runs) {
        const m = await fetchMetrics(r.name, r.offset);
        if (m.records.length) { r.records.push(...m.records); changed = true; addSetCharts(el, charts, names, m.records); }
        r.offset = m.offset;
        r.status = m.status;
        if (onStatus) onStatus(r, m);
      }
      if (changed) redraw(charts, runs);
      el.dataset.records = String(runs.reduce((n, r) => n + r.records.length, 0));
      // A running run is followed: new lines of metrics.jsonl appear without a reload.
      if (runs.some(r => r.status === "running" || r.status === null)) setTimeout(tick, 1000);
      else setTimeout(tick, 5000);
    }
    await tick();
  }

  function runPage(name) {
    const status = document.getElementById("status");
    follow([name], document.getElementById("charts"), (r, m) => {
      status.textContent = m.status;
      status.className = `status ${m.status}`;
    });
  }

  function comparePage(names) { follow(names, document.getElementById("charts")); }

  function runsPage() {
    const b = document.getElementById("compare");
    if (!b) return;
    b.addEventListener("click", () => {
      const picked = [...document.querySelectorAll("input.pick:checked")].map(x => x.value);
      if (picked.length < 1) { alert("Tick one run (its base vs tuned table) or more (their curves side by side)"); return; }
      location.href = "/compare?" + picked.map(n => "run=" + encodeURIComponent(n)).join("&");
    });
  }

  function chatPage(name) {
    const log = document.getElementById("log"), form = document.getElementById("chatform");
    const input = document.getElementById("message"), system = document.getElementById("system");
    let history = [];
    function bubble(role, text) {
      const d = document.createElement("div");
      d.className = `msg ${role}`;
      d.textContent = text;
      log.appendChild(d);
      log.scrollTop = log.scrollHeight;
      return d;
    }
    document.getElementById("reset").addEventListener("click", () => { history = []; log.innerHTML = ""; });
    form.addEventListener("submit", async ev => {
      ev.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      history.push({ role: "user", content: text });
      bubble("user", text);
      const out = bubble("assistant pending", "");
      const r = await fetch(`/api/chat/${encodeURIComponent(name).replace(/%2F/g, "/")}`, {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ messages: history, system: system.value }),
      });
      if (!r.ok) {
        let why = `HTTP ${r.status}`;
        try { why = (await r.json()).error || why; } catch (_) { /* not JSON: the status says it */ }
        out.textContent = `error: ${why}`; out.className = "msg error"; history.pop(); return;
      }
      const reader = r.body.getReader(), dec = new TextDecoder();
      let reply = "";
      for (;;) {  // streamed: the reply grows as the model writes it
        const { value, done } = await reader.read();
        if (done) break;
        reply += dec.decode(value, { stream: true });
        out.textContent = reply;
      }
      out.className = "msg assistant done";
      history.push({ role: "assistant", content: reply });
    });
  }

  // What a page needs comes as data on <body> (the server writes no inline script: its CSP allows none).
  const pages = { runs: runsPage, run: runPage, compare: comparePage, chat: chatPage };
  const kind = document.body.dataset.page;
  if (pages[kind]) pages[kind](JSON.parse(document.body.dataset.args || "null"));
  return { runPage, comparePage, runsPage, chatPage };
})();
