"""The usage page in headless Chromium (Debian's package, driven by Playwright through executable_path):
a signed link opens it, it shows the figures and the unread alerts, and posting events changes them
within one poll; the period names its last day and the days chart has day labels, figures and text for screen
readers; everything it loads comes from Tally. Bad and expired links are refused."""

from __future__ import annotations

import shutil
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from tally.settings import ROOT, Settings
from tests.metering.helpers import metered, pipeline, tenant_keys
from tests.support import running
from tally.usage import links

SECRET = "test-usage-link-secret"
POLL_S = 2
SCREENSHOT = ROOT / ".local" / "log" / "tests" / "usage-page.png"  # docs/usage-page.png is a copy of one


def _event(n: int) -> dict:
    return {"specversion": "1.0", "id": f"p-{n}", "source": "app", "type": "api.call", "subject": "acme", "data": {}}


async def test_usage_page_shows_figures_that_follow_new_events(isolated: Settings) -> None:
    chromium = shutil.which("chromium")
    if chromium is None and shutil.which("apt-get") is None:
        pytest.skip("outside the project: not a Debian system, so Debian's chromium cannot be installed")
    assert chromium, "Debian's chromium is not installed: bash deploy/local/chromium.sh (deploy/local/test.sh runs it)"
    from playwright.async_api import async_playwright, expect

    settings = metered(isolated).model_copy(update={"usage_link_secret": SECRET, "usage_page_poll_s": POLL_S})
    tenant, admin, writer = await tenant_keys(settings)
    with pipeline(settings) as gw, running("jobs", ["jobs"], settings, TALLY_USAGE_ALERTS_REFRESH_S="0.5"):
        async with gw.client(admin) as api, gw.client(writer) as writes:
            plan = {"id": "team", "meters": [{"meter": "api_calls", "included": 5, "limit_mode": "soft"},
                                             {"meter": "tokens", "included": 1000, "limit_mode": "hard"}]}
            assert (await api.post("/v1/plans", json=plan)).status_code == 201
            start = (date.today() - timedelta(days=10)).isoformat()
            assert (await api.put("/v1/subscriptions/acme", json={"plan_id": "team", "start_date": start})
                    ).status_code == 200
            for n in range(3):
                assert (await writes.post("/v1/events", json=_event(n))).status_code == 202
            link = await api.post("/v1/usage/links", json={"subject": "acme", "ttl_s": 600})
            assert link.status_code == 201, link.text
            url = gw.url + link.json()["url"]

            assert (await api.get(url.replace("token=", "token=x"))).status_code == 403
            expired = links.Signer(SECRET).sign(links.Claims(link.json()["id"], tenant, "acme", int(time.time()) - 1))
            assert (await api.get(f"/usage/acme?token={expired}")).status_code == 403
            assert (await api.get(f"/usage/other?token={link.json()['url'].split('token=')[1]}")).status_code == 403

            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = await browser.new_page(viewport={"width": 820, "height": 640})
                loaded: list[str] = []
                page.on("request", lambda request: loaded.append(request.url))
                await page.goto(url)
                used = page.locator('[data-meter="api_calls"] .used')
                await page.wait_for_function(
                    "() => document.querySelector('[data-meter=\"api_calls\"] .used')?.textContent === '3'",
                    timeout=60_000)
                for n in range(3, 7):
                    assert (await writes.post("/v1/events", json=_event(n))).status_code == 202
                await page.wait_for_function(
                    "() => document.querySelector('[data-meter=\"api_calls\"] .used')?.textContent === '7'",
                    timeout=60_000)
                assert await page.locator('[data-meter="api_calls"] .overage').text_content() == "2"
                await page.wait_for_function("() => document.querySelectorAll('#alerts .alert').length === 2",
                                             timeout=60_000)
                assert "Figures as of" in await page.locator("#freshness").text_content()
                assert await page.locator('[data-meter="tokens"] .mode').text_content() == "hard limit"
                assert await used.count() == 1

                # The period says its last day, not the next period's first (issue 19: "2026-12-01 to 2027-01-01").
                figures = (await api.get(url.replace("?token=", "/data?token="))).json()
                first = date.fromisoformat(figures["usage"]["period_start"][:10])
                last = date.fromisoformat(figures["usage"]["period_end"][:10]) - timedelta(days=1)
                assert first.month == last.month  # anchor day 1: a period never spans two months
                await expect(page.locator("#period")).to_have_text(
                    f"Period {first.day}–{last.day} {last:%B} {last.year} · plan team")
                # The days chart: a day label under each column, the figure of each day with usage above it, and
                # each day's date and figure as text for a screen reader.
                history = next(m["days"] for m in figures["history"]["meters"] if m["meter"] == "api_calls")
                chart = page.get_by_role("list", name="api_calls used per day")
                await expect(chart.get_by_role("listitem")).to_have_count(len(history))
                await expect(chart.locator(".day")).to_have_text([str(int(d["date"][8:10])) for d in history])
                today = datetime.now(timezone.utc).date()
                column = chart.locator(f'li[data-date="{today.isoformat()}"]')
                await expect(column.locator(".value")).to_have_text("7")
                await expect(column.locator(".sr")).to_have_text(f"{today.day} {today:%B} {today.year}: 7 used")
                assert "7" not in await chart.locator(f'li:not([data-date="{today.isoformat()}"]) .value').all_inner_texts()
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
                await browser.close()
    assert loaded and all(u.startswith(gw.url) for u in loaded), loaded
