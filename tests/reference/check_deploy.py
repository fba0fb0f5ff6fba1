"""Validates Kubernetes manifests offline, for tests/deploy.rs.

    python check_deploy.py FILE... ('-' reads stdin, e.g. `kubectl kustomize` output)

Built-in kinds are checked with kubernetes-validate (strict: unknown fields are errors)
against the schemas it ships, for the oldest and the newest Kubernetes version named
below. KEDA's ScaledObject/TriggerAuthentication and the Prometheus Operator's
ServiceMonitor are checked with cloudcoil's pydantic models, generated from those
projects' CRDs: types, enums and required fields by pydantic, and unknown fields by
comparing the document with the model's dump (pydantic ignores extra fields).

Prints one JSON object per resource: {"source", "kind", "name", "ok", "errors"}.
Exits 1 when any resource fails.
"""

import json
import sys

import kubernetes_validate
import yaml

VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def crd_models():
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as prometheus

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus.ServiceMonitor,
    }


def unknown_fields(doc, dumped, path=""):
    """Paths in doc that the model's dump does not have."""
    out = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}.{key}"
            if not isinstance(dumped, dict) or key not in dumped:
                out.append(here)
            else:
                out += unknown_fields(value, dumped[key], here)
    elif isinstance(doc, list) and isinstance(dumped, list):
        for i, (a, b) in enumerate(zip(doc, dumped)):
            out += unknown_fields(a, b, f"{path}[{i}]")
    return out


def check(doc, models):
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    model = models.get((api, kind))
    if model is not None:
        try:
            parsed = model.model_validate(doc)
        except Exception as e:  # pydantic.ValidationError
            return [str(e)]
        dumped = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
        return [f"unknown field {p}" for p in unknown_fields(doc, dumped)]
    errors = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"no schema for {api} {kind} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"Kubernetes {version}: {where}: {e.message}")
    return errors


def main(paths):
    models = crd_models()
    failed = False
    for path in paths:
        text = sys.stdin.read() if path == "-" else open(path).read()
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            errors = check(doc, models)
            failed |= bool(errors)
            print(
                json.dumps(
                    {
                        "source": path,
                        "kind": doc.get("kind"),
                        "name": (doc.get("metadata") or {}).get("name"),
                        "ok": not errors,
                        "errors": errors,
                    }
                )
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
