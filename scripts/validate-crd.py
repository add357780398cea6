#!/usr/bin/env python3
"""Validate Kubernetes manifests offline and strictly.

    scripts/validate-crd.py [--kubernetes-version 1.29.0] [--crd CRD.yaml]... FILE...

Every document of every FILE gets exactly one schema:
- a custom resource (its apiVersion's group and its kind are a --crd's) is checked against
  that CRD's `spec.versions[].schema.openAPIV3Schema` for its version, which must be
  served. OpenAPI v3 as Kubernetes reads it: `nullable`, `x-kubernetes-int-or-string`,
  `x-kubernetes-preserve-unknown-fields`, `x-kubernetes-embedded-resource`. Strict like
  `kubernetes-validate --strict`: an object schema that lists `properties` and neither
  preserves unknown fields nor says `additionalProperties` admits no other field (the API
  server would drop it silently). Its metadata is checked as an ObjectMeta, and parts the
  CRD leaves open but an admission webhook checks as core types are checked as those: a
  SidecarSet's containers, initContainers and volumes as a Pod's, as Kruise's webhook does;
- any other document goes to kubernetes-validate (strict) for that Kubernetes version; a
  kind it has no schema for is an error here, not a warning.

Exit status: 0 all valid; 1 an invalid document (each problem is printed as
`FILE: document N (Kind/name): PATH: what is wrong`); 2 bad usage, an unreadable or
unparsable file, or a bad CRD. Needs PyYAML, jsonschema and kubernetes-validate:
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install PyYAML jsonschema kubernetes-validate
"""

import argparse
import copy
import sys


def fail(message):
    """Not a verdict on a document: exit 2, never 1."""
    print(f"validate-crd: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as error:
    fail(f"{error}; install with: "
         "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install PyYAML jsonschema kubernetes-validate")

# Custom resources with fields their CRD leaves open (x-kubernetes-preserve-unknown-fields)
# that hold core types: spec field -> how it sits in a PodSpec. The CRD's own fields of an
# item (upgradeStrategy, podInjectPolicy, ...) are taken off before the Pod check.
POD_PARTS = {
    ("apps.kruise.io", "SidecarSet"): ("containers", "initContainers", "volumes"),
}


class Invalid(Exception):
    """Problems with one document: a list of (path, message)."""

    def __init__(self, problems):
        super().__init__(problems)
        self.problems = problems


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_documents(path):
    try:
        with open(path, encoding="utf-8") as file:
            return [d for d in yaml.load_all(file, Loader=UniqueKeyLoader) if d is not None]
    except (OSError, yaml.YAMLError) as error:
        fail(f"{path}: {error}")


def show_path(parts):
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def to_json_schema(node):
    """A CRD's structural OpenAPI v3 schema as a strict JSON Schema (draft 4)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key in ("description", "example", "externalDocs", "default"):
            continue
        else:
            out[key] = value
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False) is True
    if out.pop("x-kubernetes-embedded-resource", False) is True:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        out["required"] = sorted(set(out.get("required", [])) | {"apiVersion", "kind"})
    if out.pop("x-kubernetes-int-or-string", False) is True:
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    for key in [k for k in out if k.startswith("x-kubernetes-")]:
        del out[key]  # list/map types, CEL rules: not structure
    if out.pop("nullable", False) is True:
        out = {"anyOf": [{"type": "null"}, out]}
    return out


class Crd:
    def __init__(self, path, document):
        if document.get("apiVersion") != "apiextensions.k8s.io/v1" or \
                document.get("kind") != "CustomResourceDefinition":
            fail(f"{path}: not an apiextensions.k8s.io/v1 CustomResourceDefinition")
        spec = document["spec"]
        self.path = path
        self.group = spec["group"]
        self.kind = spec["names"]["kind"]
        self.scope = spec.get("scope")
        self.versions = {}
        for version in spec["versions"]:
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema is None:
                fail(f"{path}: version {version['name']} has no openAPIV3Schema")
            try:
                jsonschema.Draft4Validator.check_schema(to_json_schema(schema))
            except jsonschema.SchemaError as error:
                fail(f"{path}: version {version['name']}: not a schema: {error.message}")
            self.versions[version["name"]] = (version.get("served", False), schema)

    def schema_for(self, version):
        if version not in self.versions:
            raise Invalid([("apiVersion", f"{self.group}/{version} is not a version of {self.kind} "
                            f"({', '.join(sorted(self.versions))}) in {self.path}")])
        served, schema = self.versions[version]
        if not served:
            raise Invalid([("apiVersion", f"{self.group}/{version} {self.kind} is not served")])
        return to_json_schema(schema), schema


def schema_errors(schema, document):
    validator = jsonschema.Draft4Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [(show_path(e.absolute_path), e.message) for e in errors]


def kubernetes_errors(document, version, note=""):
    """kubernetes-validate, strict; it reports its best match, one problem at a time."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [(show_path(error.path), error.message + note)]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [("kind", f"{error.message}, and no --crd defines it")]
    return []


def object_meta_errors(document, version):
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        return [("metadata", "a mapping with a name is required")]
    problems = []
    if not metadata.get("name") and not metadata.get("generateName"):
        problems.append(("metadata", "'name' is a required property"))
    # ObjectMeta is the same type everywhere: check it as a ConfigMap's.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}
    problems += kubernetes_errors(carrier, version)
    return problems


def pod_part_errors(document, raw_schema, parts, version):
    """The open core-type parts of a custom resource, checked as a made-up Pod's."""
    spec = document.get("spec")
    if not isinstance(spec, dict):
        return []
    spec_schema = raw_schema.get("properties", {}).get("spec", {}).get("properties", {})
    pod_spec = {}
    for field in parts:
        items = spec.get(field)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            continue  # the CRD schema reports the wrong type
        own = set(spec_schema.get(field, {}).get("items", {}).get("properties", {}))
        pod_spec[field] = [{k: v for k, v in item.items() if k not in own} for item in items]
    if not pod_spec:
        return []
    if not pod_spec.get("containers"):
        # A PodSpec needs a container: a stand-in, as Kruise's webhook adds one.
        pod_spec["containers"] = [{"name": "stand-in", "image": "stand-in"}]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod_spec}
    return kubernetes_errors(pod, version, " (checked as a Pod's, as the operator's webhook does)")


def validate(document, crds, version):
    if not isinstance(document, dict):
        raise Invalid([("(document)", "not a mapping")])
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise Invalid([("(document)", "apiVersion and kind are required strings")])
    group, _, crd_version = api_version.rpartition("/")
    crd = crds.get((group, kind))
    if crd is None:
        problems = kubernetes_errors(document, version)
    else:
        schema, raw = crd.schema_for(crd_version)
        problems = schema_errors(schema, document)
        problems += object_meta_errors(document, version)
        if crd.scope == "Cluster" and isinstance(document.get("metadata"), dict) \
                and "namespace" in document["metadata"]:
            problems.append(("metadata.namespace", f"{kind} is cluster-scoped: the API server would drop it"))
        if (group, kind) in POD_PARTS:
            problems += pod_part_errors(copy.deepcopy(document), raw, POD_PARTS[(group, kind)], version)
    if problems:
        raise Invalid(problems)
    return "its CRD" if crd else f"Kubernetes {version}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubernetes-version", default="1.29.0")
    parser.add_argument("--crd", action="append", default=[], metavar="CRD.yaml")
    parser.add_argument("--quiet", action="store_true", help="print only problems")
    parser.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args()

    crds = {}
    for path in args.crd:
        for document in load_documents(path):
            crd = Crd(path, document)
            crds[(crd.group, crd.kind)] = crd

    failed = False
    for path in args.files:
        for number, document in enumerate(load_documents(path), start=1):
            name = document.get("metadata", {}).get("name") if isinstance(document, dict) and \
                isinstance(document.get("metadata"), dict) else None
            label = f"{path}: document {number} ({document.get('kind') if isinstance(document, dict) else '?'}/{name})"
            try:
                against = validate(document, crds, args.kubernetes_version)
            except Invalid as invalid:
                failed = True
                for where, message in invalid.problems:
                    print(f"{label}: {where}: {message}", file=sys.stderr)
                continue
            if not args.quiet:
                print(f"{label}: valid against {against}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except kubernetes_validate.utils.VersionNotSupportedError as error:
        fail(error.message)
    except (KeyError, TypeError, AttributeError) as error:  # a malformed --crd
        fail(f"{type(error).__name__}: {error}")
