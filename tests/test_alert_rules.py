"""The Prometheus alert rules (deploy/prometheus/tally-rules.yml) pass `promtool check rules`, and their
unit tests (tally-rules.test.yml: each alert firing and not firing on input series) pass
`promtool test rules`, with the promtool of deploy/local/promtool.sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tally.settings import ROOT
from tests.local_tools import built

RULES = ROOT / "deploy" / "prometheus" / "tally-rules.yml"
UNIT_TESTS = ROOT / "deploy" / "prometheus" / "tally-rules.test.yml"


@pytest.fixture(scope="module")
def promtool() -> Path:
    return built("promtool")


def _run(*args: str, cwd: Path = RULES.parent) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_rules_pass_promtool_check(promtool: Path) -> None:
    done = _run(str(promtool), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_unit_tests_pass(promtool: Path) -> None:
    done = _run(str(promtool), "test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert firing == alerts and quiet == alerts


def test_a_broken_rule_fails_the_unit_tests(promtool: Path, tmp_path: Path) -> None:
    """The unit tests can fail: a lag threshold raised beyond the test's figures stops the alert firing."""
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("(tally_processor_consumer_lag)) > 1000",
                                                                 "(tally_processor_consumer_lag)) > 100000", 1))
    done = _run(str(promtool), "test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0 and "TallyConsumerLagGrowing" in done.stdout + done.stderr
