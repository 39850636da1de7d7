"""docker-compose.yml cannot run here; it must still agree with the native scripts."""

from __future__ import annotations

import configparser
from pathlib import Path

import yaml

from tally.settings import ROOT, Settings


def _versions() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / "deploy/local/versions.env").read_text().splitlines()
             if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _host_port(service: dict) -> set[str]:
    return {port.split(":")[1] for port in service.get("ports", [])}


def test_images_and_versions_match_the_native_scripts() -> None:
    v, services = _versions(), _compose()["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{v['KAFKA_VERSION']}"
    assert services["postgres"]["image"] == f"postgres:{v['POSTGRES_VERSION']}"
    assert services["redis"]["image"] == f"redis:{v['REDIS_VERSION']}"
    assert services["stripe-mock"]["image"] == f"stripe/stripe-mock:{v['STRIPE_MOCK_VERSION']}"
    assert {"gateway", "processor", "jobs", "alerts", "prometheus"} <= set(services)
    assert {services[name]["build"] for name in ("gateway", "processor", "jobs", "alerts")} == {"."}
    assert (ROOT / "Dockerfile").exists()


def test_ports_match_the_native_scripts() -> None:
    v, services = _versions(), _compose()["services"]
    assert _host_port(services["kafka"]) == {v["KAFKA_PORT"]}
    assert _host_port(services["postgres"]) == {v["POSTGRES_PORT"]}
    assert _host_port(services["redis"]) == {v["REDIS_PORT"]}
    assert _host_port(services["stripe-mock"]) == {v["STRIPE_MOCK_PORT"]}
    assert _host_port(services["gateway"]) == {v["GATEWAY_PORT"]}


def test_settings_match_the_native_scripts() -> None:
    v, services = _versions(), _compose()["services"]
    pg = services["postgres"]["environment"]
    assert (pg["POSTGRES_DB"], pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]) == (
        v["POSTGRES_DB"], v["POSTGRES_USER"], v["POSTGRES_PASSWORD"])
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_HEAP_OPTS"].endswith(f"-Xmx{v['KAFKA_HEAP']}")
    native = (ROOT / "deploy/local/kafka.sh").read_text()
    for prop in ("num.partitions", "offsets.topic.num.partitions", "group.initial.rebalance.delay.ms",
                 "auto.create.topics.enable"):
        env_name = "KAFKA_" + prop.replace(".", "_").upper()
        assert f"{prop}={str(kafka[env_name]).lower()}" in native, prop
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert defaults["kafka_bootstrap"] == f"127.0.0.1:{v['KAFKA_PORT']}"
    assert defaults["database_url"] == (f"postgresql://{v['POSTGRES_USER']}:{v['POSTGRES_PASSWORD']}"
                                        f"@127.0.0.1:{v['POSTGRES_PORT']}/{v['POSTGRES_DB']}?sslmode=disable")
    assert defaults["redis_url"].startswith(f"redis://127.0.0.1:{v['REDIS_PORT']}/")
    assert defaults["stripe_api_base"] == f"http://127.0.0.1:{v['STRIPE_MOCK_PORT']}"
    assert defaults["gateway_port"] == int(v["GATEWAY_PORT"])
    scraped = {target for job in yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
               for config in job["static_configs"] for target in config["targets"]}
    assert scraped == {f"gateway:{v['GATEWAY_PORT']}", f"processor:{defaults['processor_metrics_port']}",
                       f"jobs:{defaults['jobs_metrics_port']}", f"alerts:{defaults['alerts_metrics_port']}"}


def test_the_image_ships_everything_the_packages_need() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    packages = [p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "benchmarks")]
    assert packages == ["tally"], "everything installed lives under the one import name tally (ADR 0120)"
    for package in [*packages, "deploy/migrations"]:
        assert f"COPY {package} " in dockerfile, package
    assert Path(ROOT / "deploy/prometheus/prometheus.yml").exists()


APPS = {"gateway", "processor", "jobs", "alerts"}


def _supervised() -> configparser.ConfigParser:
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(ROOT / "deploy/local/supervisord.conf")
    return conf


def test_processes_are_restarted_as_under_the_native_supervisor() -> None:
    services, conf = _compose()["services"], _supervised()
    programs = {section.removeprefix("program:"): conf[section] for section in conf.sections()
                if section.startswith("program:")}
    assert set(programs) == APPS
    for name, program in programs.items():
        assert program["autorestart"] == "true", name
        subcommand = services[name]["command"][-1].split("exec tally ")[1].split()[0]
        assert program["command"].endswith(f"-m tally.cli {subcommand}"), name
        assert services[name]["restart"] == "unless-stopped", name


def test_redis_never_evicts_as_under_the_native_script() -> None:
    v, command = _versions(), _compose()["services"]["redis"]["command"]
    assert v["REDIS_MAXMEMORY_POLICY"] == "noeviction"  # ADR 5: gateway state is never evicted
    assert command[command.index("--maxmemory-policy") + 1] == v["REDIS_MAXMEMORY_POLICY"]
    assert command[command.index("--maxmemory") + 1] == v["REDIS_MAXMEMORY"]


def test_every_process_gets_the_secrets_made_once() -> None:
    services = _compose()["services"]
    assert "deploy/local/secrets.sh /state/secrets.env" in services["init"]["command"][-1]
    for name in APPS:
        assert services[name]["command"][-1].startswith("set -a && . /state/secrets.env && exec tally "), name
        assert "state:/state" in services[name]["volumes"], name
    assert "COPY deploy/local/secrets.sh " in (ROOT / "Dockerfile").read_text()
    assert "deploy/local/secrets.sh" in (ROOT / "deploy/local/apps.sh").read_text()
