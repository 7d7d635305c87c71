// The outbox report's charts (uPlot). Data comes from the page itself (#report-data).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"];
  var charts = [];
  var state = { rendered: 0, errors: [] };
  window.__report = state;

  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function utc(sec) {
    var d = new Date(sec * 1000);
    return d.getUTCFullYear() + "-" + pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate()) +
      " " + pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes());
  }
  function local(sec, tz) {
    if (!tz) return "";
    try {
      return new Intl.DateTimeFormat("en-US", { timeZone: tz, month: "2-digit", day: "2-digit",
        hour: "2-digit", minute: "2-digit", hour12: false, timeZoneName: "short" })
        .format(new Date(sec * 1000));
    } catch (e) { return ""; }
  }
  function compact(v) {
    if (v == null) return "";
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(a >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(v * 100) / 100);
  }
  // With one point (or a few close together) a time axis would span years: pad it.
  function span(values) {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (v) { if (v != null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    if (lo === Infinity) return null;
    if (hi - lo < 7200) { lo -= 3600; hi += 3600; }
    return [lo, hi];
  }
  // The x axis in UTC, 24-hour: the date at midnight, the hour otherwise.
  function xValues(u, splits) {
    return splits.map(function (v) {
      var d = new Date(v * 1000);
      var hh = d.getUTCHours(), mm = d.getUTCMinutes();
      if (hh === 0 && mm === 0) return pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate());
      return pad(hh) + ":" + pad(mm);
    });
  }
  function tsSec(text) { return Date.parse(text) / 1000; }
  function utcDate(ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); }
  function width(el) { return Math.max(300, el.clientWidth - 16); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  var xs = [];
  for (var i = 0; i < data.n; i++) xs.push(data.t0 + i * data.step);

  // Red ticks under the plot for missing hours, orange lines for findings, blue dots
  // for revisions.
  function marksHook(group) {
    var gaps = group.gaps.map(tsSec);
    return function (u) {
      var ctx = u.ctx, b = u.bbox, dpr = window.devicePixelRatio || 1;
      var w = Math.max(2 * dpr, b.width / data.n);
      ctx.save();
      ctx.fillStyle = "#d62728";
      gaps.forEach(function (t) {
        var x = u.valToPos(t, "x", true);
        ctx.fillRect(x - w / 2, b.top + b.height - 5 * dpr, w, 5 * dpr);
      });
      group.marks.forEach(function (m) {
        var x = u.valToPos(tsSec(m.ts), "x", true);
        if (m.kind === "finding") {
          ctx.strokeStyle = "#ff7f0e";
          ctx.lineWidth = 1.5 * dpr;
          ctx.beginPath(); ctx.moveTo(x, b.top); ctx.lineTo(x, b.top + b.height); ctx.stroke();
        } else {
          ctx.fillStyle = "#1f77b4";
          ctx.beginPath(); ctx.arc(x, b.top + 4 * dpr, 3 * dpr, 0, 2 * Math.PI); ctx.fill();
          ctx.fillStyle = "#d62728";
        }
      });
      ctx.restore();
    };
  }

  function stacked(series) {
    var sums = xs.map(function () { return 0; });
    return series.map(function (s) {
      return s.values.map(function (v, i) {
        if (v == null) return null;
        sums[i] += Math.max(0, v);
        return sums[i];
      });
    });
  }

  function groupChart(group, target) {
    var box = el("div", "chart");
    box.id = "chart-" + group.id;
    box.dataset.group = group.id;
    box.dataset.dataset = group.dataset;
    box.dataset.ba = group.ba;
    box.appendChild(el("h3", null, group.title));
    target.appendChild(box);
    var tz = data.tz[group.ba];
    var stack = group.kind === "stack";
    var ys = stack ? stacked(group.series) : group.series.map(function (s) { return s.values; });
    var series = [{ value: function (u, v) { return v == null ? "-" : utc(v) + " UTC"; } }];
    group.series.forEach(function (s, i) {
      var color = PALETTE[i % PALETTE.length];
      series.push({
        label: s.label, stroke: color, width: 1.25,
        fill: stack ? color + "55" : undefined,
        value: function (u, v, si, idx) {
          var raw = idx == null ? null : group.series[si - 1].values[idx];
          return raw == null ? "-" : Math.round(raw).toLocaleString("en-US");
        },
      });
    });
    var bands = [];
    if (stack) for (var b = 1; b < ys.length; b++) bands.push({ series: [b + 1, b] });
    var localLine = el("div", "local");
    var points = 0;
    ys.forEach(function (y) { y.forEach(function (v) { if (v != null) points++; }); });
    var opts = {
      width: width(box), height: 170, tzDate: utcDate, series: series, bands: bands,
      legend: { show: group.series.length <= 12 },
      scales: { x: { time: true } },
      axes: [{ values: xValues }, { size: 56, values: function (u, splits) { return splits.map(compact); } }],
      hooks: {
        draw: [marksHook(group)],
        setCursor: [function (u) {
          var idx = u.cursor.idx;
          localLine.textContent = idx == null || !tz ? "" : group.ba + " local: " + local(xs[idx], tz);
        }],
      },
    };
    var chart = new uPlot(opts, [xs].concat(ys), box);
    box.appendChild(localLine);
    box.dataset.series = String(group.series.length);
    box.dataset.points = String(points);
    box.dataset.gaps = String(group.gaps.length);
    if (group.gaps.length) {
      var shown = group.gaps.slice(0, 6).map(function (t) { return t.slice(5, 16).replace("T", " "); });
      var more = group.gaps.length > 6 ? " and " + (group.gaps.length - 6) + " more" : "";
      var gapLine = el("div", "gaps", "missing " + group.gaps.length + " h: " + shown.join(", ") + more);
      gapLine.dataset.hours = group.gaps.join(" ");
      box.appendChild(gapLine);
    }
    charts.push(chart);
    return chart;
  }

  function renderValues(ba) {
    var target = document.getElementById("charts");
    charts.forEach(function (c) { c.destroy(); });
    charts = [];
    target.textContent = "";
    var groups = data.groups.filter(function (g) { return !ba || g.ba === ba; });
    if (!groups.length) target.appendChild(el("p", "hint", "No staged values in the window."));
    groups.forEach(function (g) { groupChart(g, target); });
    state.rendered = groups.length;
  }

  function picker() {
    if (!data.selector) return null;
    var select = el("select");
    select.id = "ba-select";
    data.bas.forEach(function (ba) {
      var o = el("option", null, ba);
      o.value = ba;
      select.appendChild(o);
    });
    select.addEventListener("change", function () { renderValues(select.value); });
    var holder = document.getElementById("ba-picker");
    holder.appendChild(document.createTextNode(" for "));
    holder.appendChild(select);
    holder.appendChild(el("span", "hint", " (" + data.bas.length + " BAs: one BA at a time)"));
    return select.value;
  }

  function simpleChart(id, title, x, ys, labels, yValues) {
    var box = document.getElementById(id);
    box.appendChild(el("h3", null, title));
    if (!x.length) { box.appendChild(el("p", "hint", "Nothing recorded yet.")); return; }
    var series = [{ value: function (u, v) { return v == null ? "-" : utc(v) + " UTC"; } }];
    ys.forEach(function (y, i) {
      series.push({ label: labels[i], stroke: PALETTE[i], width: 1.5,
        points: { show: true, size: 5 }, paths: yValues === "points" ? function () { return null; } : undefined });
    });
    var axes = [{ values: xValues }, { size: yValues === "time" ? 96 : 70 }];
    var scales = { x: { time: true, range: span(x) } };
    if (yValues === "time") {
      axes[1].values = function (u, splits) {
        return splits.map(function (v) { return utc(Math.round(v / 3600) * 3600).slice(5); });
      };
      series[1].value = function (u, v) { return v == null ? "-" : utc(v); };
      scales.y = { range: span(ys[0]) };
    }
    new uPlot({ width: width(box), height: 200, tzDate: utcDate, series: series, axes: axes,
      scales: scales }, [x].concat(ys), box);
  }

  function runsTable() {
    var runs = data.runs.slice(-20).reverse();
    var t = el("table");
    t.innerHTML = "<thead><tr><th>run</th><th>stage</th><th>started (UTC)</th><th>seconds</th>" +
      "<th>rows</th><th>status</th><th>error</th></tr></thead>";
    var body = el("tbody");
    runs.forEach(function (r) {
      var tr = el("tr", "r-" + r.status);
      [r.id, r.stage, r.started_at, r.seconds == null ? "-" : r.seconds.toFixed(2), r.rows, r.status,
        r.error || ""].forEach(function (v) { tr.appendChild(el("td", null, String(v))); });
      body.appendChild(tr);
    });
    t.appendChild(body);
    document.getElementById("runs-table").appendChild(t);
  }

  function runsChart() {
    var byStage = { fetch: [], send: [] };
    var times = data.runs.map(function (r) { return r.t; });
    data.runs.forEach(function (r, i) {
      Object.keys(byStage).forEach(function (s) {
        byStage[s][i] = r.stage === s && r.seconds != null ? r.seconds : null;
      });
    });
    var failed = data.runs.map(function (r) { return r.status === "failed" ? (r.seconds || 0) : null; });
    simpleChart("runs-chart", "Run durations (seconds; failed runs in red)", times,
      [byStage.fetch, byStage.send, failed], ["fetch", "send", "failed"], "points");
  }

  try {
    var chosen = picker();
    renderValues(chosen);
    var bl = data.backlog;
    simpleChart("backlog-chart", "Pending rows over time", bl.t, [bl.pending], ["pending"]);
    simpleChart("delivered-chart", "Newest acknowledged hour over time", bl.t, [bl.delivered],
      ["newest acknowledged"], "time");
    runsChart();
    runsTable();
  } catch (e) {
    state.errors.push(String(e));
    throw e;
  }
  state.done = true;
  document.body.dataset.rendered = "1";
})();
