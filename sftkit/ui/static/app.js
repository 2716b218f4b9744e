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
  // Review: one prompt at a time, its replies side by side (as text); grades, ranks, flags, a comment.
  // Each judgement is POSTed as it is saved and appended to reviews.jsonl by the server; opening the
  // page again goes on from the first prompt this reviewer has not judged.
  function reviewPage(file) {
    const $ = id => document.getElementById(id);
    const api = "/api/review/" + encodeURIComponent(file).replace(/%2F/g, "/");
    let state = null, at = 0, picked = 0, judge = {}, criterion = "overall";
    const CRITERIA = { o: "overall", r: "relevance", c: "coherence", a: "appropriateness" };
    $("reviewer").value = localStorage.getItem("sftkit-reviewer") || "";
    const who = () => $("reviewer").value.trim();

    async function load() {
      const r = await fetch(`${api}?reviewer=${encodeURIComponent(who())}`);
      const body = await r.json();
      if (!r.ok) { $("saved").textContent = body.error; return; }
      state = body;
      $("agreement").textContent = body.agreement || "(agreement shows once two reviewers graded the same replies)";
      const next = state.prompts.findIndex(p => !(p.id in state.mine));
      at = next < 0 ? 0 : next;
      show();
    }

    function blank(p) {
      const old = state.mine[p.id];
      const j = { grades: {}, ranks: {}, flags: {}, comment: old ? old.comment : "" };
      if (old) {
        for (const [c, g] of Object.entries(old.grades)) j.grades[c] = { ...g };
        old.ranking.forEach((tier, i) => tier.forEach(c => { j.ranks[c] = i + 1; }));
        for (const [c, f] of Object.entries(old.flags)) j.flags[c] = [...f];
      }
      return j;
    }

    function show() {
      const p = state.prompts[at];
      judge = blank(p);
      picked = 0;
      $("review").hidden = false;
      $("progress").max = state.prompts.length;
      $("progress").value = Object.keys(state.mine).length;
      $("count").textContent = `prompt ${at + 1} of ${state.prompts.length}; ${Object.keys(state.mine).length} judged by ${who()}`;
      $("prompt").textContent = p.prompt;
      $("comment").value = judge.comment;
      const box = $("replies");
      box.replaceChildren();
      p.candidates.forEach((c, i) => {
        const div = document.createElement("div");
        div.className = "reply";
        div.dataset.id = c.id;
        const head = document.createElement("h3");
        head.textContent = `Reply ${String.fromCharCode(65 + i)}`;
        const text = document.createElement("pre");
        text.textContent = c.reply;  // markdown and code kept as written, never rendered
        const grades = document.createElement("div");
        grades.className = "grades";
        for (const crit of ["overall", "relevance", "coherence", "appropriateness"]) {
          const row = document.createElement("div");
          row.dataset.criterion = crit;
          const label = document.createElement("span");
          label.textContent = crit + " ";
          row.appendChild(label);
          for (let g = 1; g <= 5; g++) {
            const b = document.createElement("button");
            b.type = "button";
            b.textContent = String(g);
            b.className = "grade";
            b.dataset.grade = String(g);
            b.addEventListener("click", () => { setGrade(c.id, crit, g); });
            row.appendChild(b);
          }
          grades.appendChild(row);
        }
        const meta = document.createElement("div");
        meta.className = "meta";
        const rank = document.createElement("input");
        rank.type = "number"; rank.min = "1"; rank.max = "9"; rank.className = "rank";
        rank.addEventListener("change", () => { judge.ranks[c.id] = Number(rank.value) || undefined; paint(); });
        const rl = document.createElement("label");
        rl.append("rank ", rank);
        meta.appendChild(rl);
        for (const f of ["wrong", "unsafe"]) {
          const cb = document.createElement("input");
          cb.type = "checkbox"; cb.className = "flag"; cb.dataset.flag = f;
          cb.addEventListener("change", () => { toggleFlag(c.id, f, cb.checked); });
          const l = document.createElement("label");
          l.append(cb, " " + f);
          meta.appendChild(l);
        }
        div.append(head, text, grades, meta);
        div.addEventListener("click", () => { picked = i; paint(); });
        box.appendChild(div);
      });
      paint();
    }

    function setGrade(id, crit, g) { (judge.grades[id] ||= {})[crit] = g; paint(); }
    function toggleFlag(id, f, on) {
      const list = new Set(judge.flags[id] || []);
      if (on) list.add(f); else list.delete(f);
      judge.flags[id] = [...list];
      paint();
    }

    function paint() {
      [...$("replies").children].forEach((div, i) => {
        const id = div.dataset.id, g = judge.grades[id] || {};
        div.classList.toggle("picked", i === picked);
        for (const row of div.querySelectorAll(".grades > div")) {
          for (const b of row.querySelectorAll("button")) {
            b.classList.toggle("on", g[row.dataset.criterion] === Number(b.dataset.grade));
          }
        }
        div.querySelector(".rank").value = judge.ranks[id] || "";
        for (const cb of div.querySelectorAll(".flag")) cb.checked = (judge.flags[id] || []).includes(cb.dataset.flag);
      });
    }

    function ranking() {  // tiers, best first: the ranks given, else none (the grades order the pairs)
      const by = new Map();
      for (const [id, r] of Object.entries(judge.ranks)) if (r) by.set(r, [...(by.get(r) || []), id]);
      return [...by.keys()].sort((a, b) => a - b).map(r => by.get(r));
    }

    async function save() {
      const p = state.prompts[at];
      const body = { reviewer: who(), prompt_id: p.id, grades: judge.grades, ranking: ranking(),
                     flags: Object.fromEntries(Object.entries(judge.flags).filter(([, f]) => f.length)),
                     comment: $("comment").value };
      const r = await fetch(api, { method: "POST", headers: { "content-type": "application/json" },
                                   body: JSON.stringify(body) });
      const answer = await r.json();
      if (!r.ok) { $("saved").textContent = answer.error; return; }
      state.mine[p.id] = { grades: body.grades, ranking: body.ranking, flags: body.flags, comment: body.comment };
      const next = state.prompts.findIndex((q, i) => i > at && !(q.id in state.mine));
      const any = state.prompts.findIndex(q => !(q.id in state.mine));
      at = next >= 0 ? next : any >= 0 ? any : at;
      show();  // the next prompt first, then the word that the last one is saved
      $("saved").textContent = `saved ${p.id} at ${answer.time}`;
      refreshAgreement();
    }

    async function refreshAgreement() {  // this judgement may have changed it; the page being judged stays as it is
      const r = await fetch(`${api}?reviewer=${encodeURIComponent(who())}`);
      if (r.ok) { const b = await r.json(); if (b.agreement) $("agreement").textContent = b.agreement; }
    }

    $("who").addEventListener("submit", ev => {
      ev.preventDefault();
      if (!who()) return;
      localStorage.setItem("sftkit-reviewer", who());
      load();
    });
    $("save").addEventListener("click", save);
    $("skip").addEventListener("click", () => { at = (at + 1) % state.prompts.length; show(); });
    $("back").addEventListener("click", () => { at = (at - 1 + state.prompts.length) % state.prompts.length; show(); });
    document.addEventListener("keydown", ev => {
      if (!state || ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
      const ids = state.prompts[at].candidates.map(c => c.id);
      if (ev.key === "ArrowRight") { picked = (picked + 1) % ids.length; paint(); }
      else if (ev.key === "ArrowLeft") { picked = (picked - 1 + ids.length) % ids.length; paint(); }
      else if (ev.shiftKey && /^Digit[1-9]$/.test(ev.code)) { judge.ranks[ids[picked]] = Number(ev.code.slice(5)); paint(); }
      else if (/^[1-5]$/.test(ev.key)) setGrade(ids[picked], criterion, Number(ev.key));
      else if (ev.key in CRITERIA) { criterion = CRITERIA[ev.key]; $("criterion").textContent = criterion; }
      else if (ev.key === "f" || ev.key === "u") {
        const f = ev.key === "f" ? "wrong" : "unsafe";
        toggleFlag(ids[picked], f, !(judge.flags[ids[picked]] || []).includes(f));
      }
      else if (ev.key === "Enter") save();
      else if (ev.key === "s") $("skip").click();
      else if (ev.key === "p") $("back").click();
      else return;
      ev.preventDefault();
    });
  }

  const pages = { runs: runsPage, run: runPage, compare: comparePage, chat: chatPage, review: reviewPage };
  const kind = document.body.dataset.page;
  if (pages[kind]) pages[kind](JSON.parse(document.body.dataset.args || "null"));
  return { runPage, comparePage, runsPage, chatPage, reviewPage };
})();
