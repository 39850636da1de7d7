"""Write the strict, self-contained JSON schemas kubeconform needs for the Kubernetes kinds the chart renders.

The same conversion as yannh/kubernetes-json-schema's `-standalone-strict` folders (references inlined,
unknown fields refused, int-or-string as either, null allowed), without descriptions to keep them small.
Usage: python kubernetes.py KUBERNETES_MODULE_DIR  (the k8s.io/kubernetes Go module, for api/openapi-spec/v3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "kubernetes"
# (OpenAPI v3 file, schema name, kubeconform file name)
KINDS = [
    ("apis__apps__v1_openapi.json", "io.k8s.api.apps.v1.Deployment", "deployment-apps-v1.json"),
    ("apis__batch__v1_openapi.json", "io.k8s.api.batch.v1.Job", "job-batch-v1.json"),
    ("apis__autoscaling__v2_openapi.json", "io.k8s.api.autoscaling.v2.HorizontalPodAutoscaler",
     "horizontalpodautoscaler-autoscaling-v2.json"),
    ("apis__policy__v1_openapi.json", "io.k8s.api.policy.v1.PodDisruptionBudget", "poddisruptionbudget-policy-v1.json"),
    ("api__v1_openapi.json", "io.k8s.api.core.v1.Service", "service-v1.json"),
    ("api__v1_openapi.json", "io.k8s.api.core.v1.ConfigMap", "configmap-v1.json"),
]
DROPPED = {"description", "default", "format", "x-kubernetes-patch-merge-key", "x-kubernetes-patch-strategy",
           "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-unions",
           "x-kubernetes-group-version-kind", "x-kubernetes-validations"}


def expand(node: object, components: dict, seen: tuple[str, ...] = ()) -> object:
    if isinstance(node, list):
        return [expand(item, components, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref") or (node["allOf"][0].get("$ref") if len(node.get("allOf", [])) == 1 else None)
    if ref:
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            raise ValueError(f"recursive schema {name}")
        return expand(components[name], components, (*seen, name))
    if node.get("x-kubernetes-int-or-string"):
        return {"oneOf": [{"type": ["string", "null"]}, {"type": ["integer", "null"]}]}
    out = {key: expand(value, components, seen) for key, value in node.items()
           if key not in DROPPED and key != "properties"}
    if "properties" in node:
        out["properties"] = {key: expand(value, components, seen) for key, value in node["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def main(module_dir: str) -> None:
    spec_dir = Path(module_dir) / "api" / "openapi-spec" / "v3"
    HERE.mkdir(exist_ok=True)
    for spec_file, schema, target in KINDS:
        components = json.loads((spec_dir / spec_file).read_text())["components"]["schemas"]
        body = expand(components[schema], components)
        body["$schema"] = "http://json-schema.org/schema#"
        (HERE / target).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
