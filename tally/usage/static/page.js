// The usage page: polls its signed data URL and draws each meter's bar, figures and a labelled column per day.
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

  const MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December"];

  // The calendar day an ISO date or time names, at UTC midnight (the answer's times are already local).
  function calendarDay(iso) {
    const [y, m, d] = iso.slice(0, 10).split("-").map(Number);
    return new Date(Date.UTC(y, m - 1, d));
  }

  function longDate(day) {
    return day.getUTCDate() + " " + MONTHS[day.getUTCMonth()] + " " + day.getUTCFullYear();
  }

  // "1–31 December 2026": the period's first and last day; the answer's end is exclusive (the next period's start).
  function periodText(startIso, endIso) {
    const first = calendarDay(startIso), last = calendarDay(endIso);
    last.setUTCDate(last.getUTCDate() - 1);
    if (first.getTime() >= last.getTime()) return longDate(first);
    if (first.getUTCFullYear() !== last.getUTCFullYear()) return longDate(first) + " – " + longDate(last);
    if (first.getUTCMonth() !== last.getUTCMonth()) {
      return first.getUTCDate() + " " + MONTHS[first.getUTCMonth()] + " – " + longDate(last);
    }
    return first.getUTCDate() + "–" + longDate(last);
  }

  // One column per day of the period: its figure above, its day of the month below, and the whole of it
  // ("3 December 2026: 12 used") as text for screen readers; the visible parts are hidden from them.
  function days(meter, history) {
    const max = Math.max(1, ...history.map((d) => Number(d.used)));
    return el("ol", { class: "days", "aria-label": meter + " used per day" }, history.map((d) => {
      const fill = el("span");
      fill.style.height = (Number(d.used) / max) * 100 + "%";
      const day = calendarDay(d.date);
      return el("li", { "data-date": d.date, title: longDate(day) + ": " + d.used }, [
        el("span", { class: "value", "aria-hidden": "true" }, [Number(d.used) > 0 ? d.used : ""]),
        el("span", { class: "bar", "aria-hidden": "true" }, [fill]),
        el("span", { class: "day", "aria-hidden": "true" }, [String(day.getUTCDate())]),
        el("span", { class: "sr" }, [longDate(day) + ": " + d.used + " used"]),
      ]);
    }));
  }

  function draw(data) {
    const usage = data.usage;
    document.getElementById("subject").textContent = usage.subject;
    document.getElementById("period").textContent =
      "Period " + periodText(usage.period_start, usage.period_end) + " · plan " + usage.plan;
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
        el("p", { class: "muted days-title", "aria-hidden": "true" }, ["Used per day"]),
        days(m.meter, histories[m.meter] || []),
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
