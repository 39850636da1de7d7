"""The Helm chart (deploy/helm/tally), checked offline: `helm lint`, `helm template` with the defaults and
with every operator-managed part off, and the output checked by `kubeconform -strict` against the
Kubernetes and CRD schemas vendored in deploy/helm/schemas/ (no network at test time)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tally.settings import ROOT, Settings
from tests.local_tools import built

CHART = ROOT / "deploy" / "helm" / "tally"
SCHEMAS = ROOT / "deploy" / "helm" / "schemas"
RULES = ROOT / "deploy" / "prometheus" / "tally-rules.yml"
# Operators off, existing Kafka, database, Redis and secrets: what a user with their own services sets.
EXISTING = {
    "kafka.strimzi.enabled": "false", "kafka.topics.strimzi": "false", "kafka.bootstrap": "kafka-0.kafka:9092",
    "postgres.cnpg.enabled": "false", "postgres.existingSecret": "shop-db", "postgres.existingSecretKey": "dsn",
    "redis.enabled": "false", "redis.existingSecret": "shop-redis", "processor.autoscaling.enabled": "false",
    "gateway.autoscaling.enabled": "false", "monitoring.enabled": "false", "secrets.existingSecret": "shop-tally",
    "secrets.optional": "true", "topics.prefix": "shop.", "topics.events.partitions": "24",
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return built("helm")


@pytest.fixture(scope="module")
def kubeconform() -> Path:
    return built("kubeconform")


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=300)


def _sets(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _template(helm: Path, values: dict[str, str]) -> str:
    done = _run([str(helm), "template", "tally", str(CHART), "--namespace", "billing", *_sets(values)])
    assert done.returncode == 0, done.stderr
    return done.stdout


def _objects(manifest: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def _kinds(objects: list[dict]) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    return by_kind


def _env(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("values", [{}, EXISTING], ids=["defaults", "existing-services"])
def test_the_chart_lints(helm: Path, values: dict[str, str]) -> None:
    done = _run([str(helm), "lint", "--strict", str(CHART), *_sets(values)])
    assert done.returncode == 0, done.stdout + done.stderr


def _kubeconform(kubeconform: Path, manifest: str) -> subprocess.CompletedProcess[str]:
    return _run([str(kubeconform), "-strict", "-summary", "-output", "text",
                 "-schema-location", str(SCHEMAS / "kubernetes" / "{{ .ResourceKind }}{{ .KindSuffix }}.json"),
                 "-schema-location", str(SCHEMAS / "crds" / "{{ .Group }}" /
                                         "{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"), "-"], manifest)


@pytest.mark.parametrize("values", [{}, EXISTING], ids=["defaults", "existing-services"])
def test_the_rendered_manifests_pass_kubeconform_strict(helm: Path, kubeconform: Path,
                                                        values: dict[str, str]) -> None:
    manifest = _template(helm, values)
    done = _kubeconform(kubeconform, manifest)
    assert done.returncode == 0, done.stdout + done.stderr
    # every object was checked against a schema: none skipped, none missing
    count = len(_objects(manifest))
    assert re.search(rf"Valid: {count}, Invalid: 0, Errors: 0, Skipped: 0", done.stdout), done.stdout


@pytest.mark.parametrize(("field", "typo"), [
    ("  topicName:", "  topicNam:"),                                           # a Strimzi CRD
    ("      terminationGracePeriodSeconds:", "      terminationGracePeriod:"),  # a Kubernetes kind
    ("    poolMode: session", "    poolMode: sessions"),                        # an enum of CloudNativePG's
])
def test_kubeconform_refuses_what_the_schemas_do_not_allow(helm: Path, kubeconform: Path, field: str,
                                                           typo: str) -> None:
    manifest = _template(helm, {})
    assert field in manifest
    done = _kubeconform(kubeconform, manifest.replace(field, typo, 1))
    assert done.returncode != 0 and "Invalid: 1," in done.stdout, done.stdout


def test_the_defaults_make_every_operator_managed_part(helm: Path) -> None:
    kinds = _kinds(_objects(_template(helm, {})))
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "Cluster", "Pooler", "ScaledObject", "ServiceMonitor",
            "PodMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "Job"} <= set(kinds)
    assert {k["apiVersion"] for k in kinds["Kafka"] + kinds["KafkaNodePool"] + kinds["KafkaTopic"]} == {
        "kafka.strimzi.io/v1"}
    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    assert set(deployments) == {f"tally-{c}" for c in ("gateway", "processor", "jobs", "alerts", "redis")}
    gateway = deployments["tally-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    redis_args = deployments["tally-redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"
    commands = {name: d["spec"]["template"]["spec"]["containers"][0]["args"] for name, d in deployments.items()}
    assert commands["tally-processor"] == ["tally", "process"]
    assert commands["tally-jobs"] == ["tally", "jobs"] and commands["tally-alerts"] == ["tally", "alerts"]
    migrate = kinds["Job"][0]
    assert migrate["spec"]["template"]["spec"]["containers"][0]["args"] == ["tally", "migrate"]
    assert set(migrate["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"post-install", "pre-upgrade"}
    env = _env(deployments["tally-gateway"])
    assert env["TALLY_DATABASE_URL"]["value"].startswith("postgresql://$(PGUSER):$(PGPASSWORD)@"
                                                         "tally-postgres-pooler:5432/")
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "tally-postgres-app"
    assert {name for name in env if "secretKeyRef" in env[name].get("valueFrom", {})} >= {
        "TALLY_STRIPE_API_KEY", "TALLY_USAGE_LINK_SECRET", "TALLY_QUERY_CURSOR_SECRET", "TALLY_SECRETS_KEY"}
    assert kinds["Pooler"][0]["spec"]["pgbouncer"]["poolMode"] == "session"


def test_existing_services_replace_the_operator_managed_parts(helm: Path) -> None:
    kinds = _kinds(_objects(_template(helm, EXISTING)))
    assert not {"Kafka", "KafkaNodePool", "KafkaTopic", "Cluster", "Pooler", "ScaledObject", "ServiceMonitor",
                "PodMonitor", "PrometheusRule", "HorizontalPodAutoscaler"} & set(kinds)
    assert {d["metadata"]["name"] for d in kinds["Deployment"]} == {
        f"tally-{c}" for c in ("gateway", "processor", "jobs", "alerts")}
    for deployment in kinds["Deployment"]:
        env = _env(deployment)
        assert env["TALLY_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "shop-db", "key": "dsn"}
        assert env["TALLY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "shop-redis", "key": "url"}
        assert env["TALLY_STRIPE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "shop-tally", "key": "stripe-api-key", "optional": True}
    config = kinds["ConfigMap"][0]["data"]
    assert config["TALLY_KAFKA_BOOTSTRAP"] == "kafka-0.kafka:9092" and config["TALLY_TOPIC_PREFIX"] == "shop."
    migrate = kinds["Job"][0]
    assert migrate["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "sh", "-c", "tally migrate && tally topics create"]
    assert set(migrate["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}


@pytest.mark.parametrize(("missing", "message"), [
    ({"kafka.strimzi.enabled": "false"}, "kafka.bootstrap is required"),
    ({"postgres.cnpg.enabled": "false"}, "postgres.existingSecret is required"),
    ({"redis.enabled": "false"}, "redis.url or redis.existingSecret is required"),
])
def test_an_operator_off_without_its_replacement_is_a_clear_error(helm: Path, missing: dict[str, str],
                                                                  message: str) -> None:
    done = _run([str(helm), "template", "tally", str(CHART), *_sets(missing)])
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_the_topics_are_those_tally_creates(helm: Path) -> None:
    values = {"topics.prefix": "acme.", "topics.events.partitions": "24", "topics.counters.partitions": "6",
              "topics.dlq.partitions": "2", "topics.events.retentionMs": "86400000",
              "topics.dlq.retentionMs": "172800000"}
    objects = _objects(_template(helm, values))
    rendered = {t["spec"]["topicName"]: (t["spec"]["partitions"], t["spec"]["config"])
                for t in _kinds(objects)["KafkaTopic"]}
    config = _kinds(objects)["ConfigMap"][0]["data"]
    settings = Settings(**{name.removeprefix("TALLY_").lower(): value for name, value in config.items()
                           if name.removeprefix("TALLY_").lower() in Settings.model_fields})
    specs = settings.topics.specs(events_partitions=settings.events_partitions,
                                  events_retention_ms=settings.events_retention_ms,
                                  counters_partitions=settings.counters_partitions,
                                  dlq_partitions=settings.dlq_partitions, dlq_retention_ms=settings.dlq_retention_ms)
    assert rendered == {s.name: (s.partitions, {**s.config, "min.insync.replicas": "2"}) for s in specs}


def test_processors_scale_on_their_group_and_never_beyond_the_partitions(helm: Path) -> None:
    objects = _objects(_template(helm, {"processor.autoscaling.maxReplicas": "50", "topics.events.partitions": "16",
                                        "settings.CONSUMER_GROUP": "billing-processor"}))
    scaled = _kinds(objects)["ScaledObject"][0]["spec"]
    assert scaled["maxReplicaCount"] == 16
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == "billing-processor"
    assert trigger["metadata"]["topic"] == "tally.events.v1"
    assert _kinds(objects)["ConfigMap"][0]["data"]["TALLY_CONSUMER_GROUP"] == "billing-processor"
    processor = next(d for d in _kinds(objects)["Deployment"] if d["metadata"]["name"] == "tally-processor")
    assert "replicas" not in processor["spec"]  # KEDA owns the count


def test_the_prometheus_rule_is_the_rules_file(helm: Path) -> None:
    rule = _kinds(_objects(_template(helm, {})))["PrometheusRule"][0]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_every_value_is_documented_in_the_readme() -> None:
    readme = (CHART / "README.md").read_text()

    def leaves(node: object, path: str) -> list[str]:
        # a map of free-form entries (settings, resources, ...) is documented as one value
        if isinstance(node, dict) and node and path.rsplit(".", 1)[-1] not in {
                "settings", "keys", "resources", "parameters", "labels", "podSecurityContext", "securityContext",
                "nodeSelector", "affinity", "requests", "limits"}:
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{path}.{key}" if path else key)]
        return [path]

    undocumented = [v for v in leaves(yaml.safe_load((CHART / "values.yaml").read_text()), "")
                    if f"| `{v}` |" not in readme]
    assert not undocumented
