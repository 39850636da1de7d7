// The usage page: polls its signed data URL and draws each meter's bar, figures and days.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const dataUrl = location.pathname.replace(/\/$/, "") + "/data?token=" + encodeURIComponent(token);
  const pollMs = Number(document.body.dataset.pollS || 30) * 1000;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    (children || []).forEach((c) => node.append(c));
    return node;
  }

  function figure(label, value, cls) {
    return el("div", {}, [el("b", { class: cls }, [value]), label]);
  }

  function days(history) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "days");
    svg.setAttribute("viewBox", "0 0 " + history.length * 10 + " 40");
    svg.setAttribute("preserveAspectRatio", "none");
    const max = Math.max(1, ...history.map((d) => Number(d.used)));
    history.forEach((d, i) => {
      const h = (Number(d.used) / max) * 38;
      const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      Object.entries({ x: i * 10 + 1, y: 40 - h, width: 8, height: h }).forEach(([k, v]) => rect.setAttribute(k, v));
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = d.date + ": " + d.used;
      rect.append(title);
      svg.append(rect);
    });
    return svg;
  }

  function draw(data) {
    const usage = data.usage;
    document.getElementById("subject").textContent = usage.subject;
    document.getElementById("period").textContent =
      "Period " + usage.period_start.slice(0, 10) + " to " + usage.period_end.slice(0, 10) + " · plan " + usage.plan;
    const histories = Object.fromEntries(data.history.meters.map((m) => [m.meter, m.days]));
    const asOf = usage.meters.map((m) => m.as_of).filter(Boolean).sort().pop();
    document.getElementById("freshness").textContent =
      "Figures as of " + (asOf ? new Date(asOf).toLocaleString() : "no usage yet") +
      " · checked " + new Date().toLocaleTimeString();
    const meters = document.getElementById("meters");
    meters.replaceChildren(...usage.meters.map((m) => {
      const pct = m.percent === null ? 0 : Math.min(100, m.percent);
      const bar = el("div", { class: "bar" + (Number(m.overage) > 0 ? " over" : "") }, [el("div", { style: "width:" + pct + "%" })]);
      return el("article", { class: "meter", "data-meter": m.meter }, [
        el("h2", {}, [m.meter, el("span", { class: "mode" }, [m.limit_mode + " limit"])]),
        bar,
        el("div", { class: "figures" }, [
          figure("used", m.used, "used"), figure("included", m.included, "included"),
          figure("overage", m.overage, "overage"),
          figure("of included", m.percent === null ? "–" : m.percent + "%", "percent"),
        ]),
        days(histories[m.meter] || []),
      ]);
    }));
    const alerts = document.getElementById("alerts");
    alerts.replaceChildren(...(data.alerts.length ? data.alerts.map((a) =>
      el("li", { class: "alert" }, [a.threshold + "% of " + a.meter + " used (" + a.used + " of " + a.included + ")"]))
      : [el("li", { class: "muted" }, ["No unread alerts."])]));
  }

  async function poll() {
    try {
      const answer = await fetch(dataUrl, { cache: "no-store" });
      if (!answer.ok) {
        const problem = await answer.json();
        document.getElementById("freshness").textContent = problem.detail || problem.title;
        return;
      }
      draw(await answer.json());
    } catch (err) {
      document.getElementById("freshness").textContent = "Could not refresh: " + err;
    }
  }

  poll();
  setInterval(poll, pollMs);
})();
