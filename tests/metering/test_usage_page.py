"""The usage page in headless Chromium (Debian's package, driven by Playwright through executable_path):
a signed link opens it, it shows the figures and the unread alerts, and posting events changes them
within one poll; everything it loads comes from Tally. Bad and expired links are refused."""

from __future__ import annotations

import shutil
import time
from datetime import date, timedelta

import pytest

from tally.settings import ROOT, Settings
from tests.metering.helpers import metered, pipeline, tenant_keys
from tests.support import running
from usage import links

SECRET = "test-usage-link-secret"
POLL_S = 2
SCREENSHOT = ROOT / ".local" / "log" / "tests" / "usage-page.png"  # docs/usage-page.png is a copy of one


def _event(n: int) -> dict:
    return {"specversion": "1.0", "id": f"p-{n}", "source": "app", "type": "api.call", "subject": "acme", "data": {}}


async def test_usage_page_shows_figures_that_follow_new_events(isolated: Settings) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: bash deploy/local/chromium.sh")
    from playwright.async_api import async_playwright

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
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
                await browser.close()
    assert loaded and all(u.startswith(gw.url) for u in loaded), loaded
