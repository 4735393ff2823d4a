#!/usr/bin/env python3
"""Validates Kubernetes objects offline: no cluster, no network.

    kubectl kustomize deploy/ | validate-manifests.py [-k 1.32 ...] [--crd FILE ...] [FILE ...]

Built-in kinds are checked against the Kubernetes JSON schemas that PyPI's
kubernetes-validate bundles, strictly: an unknown field is an error, as the
API server's strict field validation (`kubectl apply --validate=strict`)
makes it. Custom resources are checked against the openAPIV3Schema of their
CRD (from the input itself or --crd) with jsonschema, unknown fields refused
unless the schema preserves them, `nullable` honoured.

Not checked here: the CRDs' CEL rules (x-kubernetes-validations;
common/tests/docs_examples.rs evaluates them with kube-cel) and the other
x-kubernetes-* structural-schema extensions, which jsonschema ignores; nor
the API server's own checks beyond the schemas (e.g. hostPort equal to
containerPort on host-network pods).

Prints one line per object and version; exits 1 when anything is refused or
has no schema. Runs from the Python environment scripts/setup.sh makes
(/opt/meshguard/python).
"""

import argparse
import sys

import jsonschema
import kubernetes_validate
import yaml


def to_jsonschema(schema):
    """A CRD's structural OpenAPI v3 schema as JSON Schema (draft 2020-12)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: to_jsonschema(s) for name, s in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = to_jsonschema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [to_jsonschema(s) for s in out[key]]
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    # The API server prunes (or, strict, refuses) what the schema does not name.
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_schemas(objects):
    """(apiVersion, kind) -> JSON Schema, for every CRD among `objects`."""
    schemas = {}
    for o in objects:
        if o.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = o["spec"]["group"], o["spec"]["names"]["kind"]
        for v in o["spec"]["versions"]:
            s = to_jsonschema(v["schema"]["openAPIV3Schema"])
            # What every object has, which a CRD's schema leaves implicit.
            s.setdefault("properties", {}).update(
                {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
            )
            s["required"] = sorted(set(s.get("required", [])) | {"apiVersion", "kind", "metadata"})
            schemas[(f"{group}/{v['name']}", kind)] = s
    return schemas


def name_of(o):
    meta = o.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{o.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def where(e):
    return ".".join(str(p) for p in e.absolute_path) or "(top)"


def validate(o, versions, custom):
    """Problems with one object, empty when it is valid for every version."""
    key = (o.get("apiVersion"), o.get("kind"))
    if key in custom:
        errors = sorted(jsonschema.Draft202012Validator(custom[key]).iter_errors(o), key=lambda e: list(e.absolute_path))
        return [f"{where(e)}: {e.message}" for e in errors]
    if not o.get("apiVersion") or not o.get("kind"):
        return ["no apiVersion or kind"]
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"Kubernetes {version}: no schema: {e.message}")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"Kubernetes {version}: {where(e)}: {e.message}")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", "--kubernetes-version", action="append", help="repeatable; default 1.32")
    p.add_argument("--crd", action="append", default=[], help="a CRD file for custom resources not in the input; repeatable")
    p.add_argument("files", nargs="*", help="YAML streams; default stdin")
    args = p.parse_args()
    versions = args.kubernetes_version or ["1.32"]

    def load(stream):
        return [d for d in yaml.safe_load_all(stream) if d is not None]

    objects = []
    for f in args.files or ["-"]:
        if f == "-":
            objects += load(sys.stdin)
        else:
            with open(f) as fh:
                objects += load(fh)
    crds = []
    for f in args.crd:
        with open(f) as fh:
            crds += load(fh)
    custom = crd_schemas(crds + objects)

    refused = 0
    for o in objects:
        if not isinstance(o, dict):
            print(f"FAIL {o!r}: not an object")
            refused += 1
            continue
        problems = validate(o, versions, custom)
        if problems:
            refused += 1
            for problem in problems:
                print(f"FAIL {name_of(o)}: {problem}")
        else:
            print(f"ok   {name_of(o)}")
    print(f"{len(objects) - refused} valid, {refused} refused (Kubernetes {', '.join(versions)}; kubernetes-validate {kubernetes_validate.__version__})")
    return 1 if refused or not objects else 0


if __name__ == "__main__":
    sys.exit(main())
