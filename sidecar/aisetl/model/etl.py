"""ETL declarations: parsing and validating ``init`` and ``build`` requests.

A declaration is what a user asked to run; it becomes one ConfigMap-shaped
document in the control store (a real ConfigMap on Kubernetes, a YAML file in
the local state dir), so both deployments store exactly the same thing.

``init`` takes the seed's pod spec YAML: exactly one container, a
``containerPort``, and the annotations ``communication_type`` (default
``hpush://``) and ``wait_timeout`` (a Go duration).

``build`` takes JSON ``{"code", "dependencies", "runtime", "id"?,
"wait_timeout"?, "communication_type"?}``. AIStore clients send ``code`` and
``dependencies`` base64-encoded; people with curl send plain text. The rule:
a value is base64 when it consists only of the base64 alphabet (``A-Z a-z 0-9
+ / =``, line breaks allowed), has a length that is a multiple of 4 without its
line breaks, and decodes to printable UTF-8 text. Anything else is taken as
plain text. Python source always contains a space, parenthesis, colon or
newline-indented block that base64 cannot, so real code is never misread.
An explicit ``"encoding": "base64"`` or ``"text"`` overrides the rule.

Every rejection is an ``InvalidSpec`` naming the field and the fix.
"""

from __future__ import annotations

import ast
import base64
import binascii
import random
import re
import string
from dataclasses import dataclass, field
from typing import Any

import yaml

from aisetl.model.durations import format_duration, parse_duration
from aisetl.model.errors import InvalidSpec

COMM_TYPES = ("hpush://", "hrev://", "hpull://")
RUNTIMES = ("python3", "python2")
KINDS = ("build", "init")
DEFAULT_WAIT_TIMEOUT = "2m"
# IDs become ConfigMap names (lowercased, '_' -> '-') and label values: at most
# 40 characters, a letter first, a letter or digit last.
ID_RE = re.compile(r"^[A-Za-z](?:[A-Za-z0-9_-]{0,38}[A-Za-z0-9])?$")
ETL_LABEL = "aisetl.io/etl"
PART_OF = "app.kubernetes.io/part-of"
MAX_CODE_BYTES = 512 * 1024  # a ConfigMap holds at most 1 MiB in all

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_B64 = re.compile(r"^[A-Za-z0-9+/\r\n]+={0,2}\s*$")


def new_etl_id(rng: random.Random | None = None) -> str:
    """A fresh ID shaped like the seed's (``JGHEoo89gg``): 10 letters and digits."""
    r = rng or random.SystemRandom()
    first = r.choice(string.ascii_letters)
    return first + "".join(r.choice(string.ascii_letters + string.digits) for _ in range(9))


RESERVED_IDS = {"init", "build", "list", "stop", "logs", "objects"}


def validate_etl_id(etl_id: str, field_name: str = "id") -> str:
    if isinstance(etl_id, str) and etl_id.lower() in RESERVED_IDS:
        raise InvalidSpec(f"{field_name}: {etl_id!r} is reserved by the API: choose another "
                          "name", field=field_name)
    if not isinstance(etl_id, str) or not ID_RE.match(etl_id):
        raise InvalidSpec(
            f"{field_name}: {etl_id!r} is not a valid ETL ID: use 1-40 letters, digits, "
            "'-' or '_', starting with a letter and ending with a letter or digit "
            "(e.g. 'md5-etl')",
            field=field_name,
        )
    return etl_id


def comm_type_label(comm_type: str) -> str:
    """``hpush://`` -> ``hpush`` (for metric labels and pod labels)."""
    return comm_type.removesuffix("://")


@dataclass(frozen=True)
class Container:
    """The one container of an ``init`` spec, as far as we need to run it."""

    name: str
    image: str
    port: int
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EtlDeclaration:
    id: str
    kind: str  # build | init
    comm_type: str = "hpush://"
    wait_timeout: str = DEFAULT_WAIT_TIMEOUT
    runtime: str = ""  # build
    code: str = ""  # build
    deps: str = ""  # build
    spec: str = ""  # init: the pod spec exactly as the user sent it
    created: float = 0.0

    @property
    def wait_timeout_seconds(self) -> float:
        return parse_duration(self.wait_timeout)

    @property
    def container(self) -> Container:
        """The parsed container of an ``init`` spec."""
        if self.kind != "init":
            raise ValueError("only init declarations have a container spec")
        return _parse_pod(self.spec)[0]

    @property
    def name(self) -> str:
        """The pod name the user gave (init) or a runtime-derived one (build)."""
        if self.kind == "init":
            return _parse_pod(self.spec)[1] or self.id
        return f"{self.runtime}-{self.id}"

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "name": self.name,
                "runtime": self.runtime, "communication_type": self.comm_type,
                "wait_timeout": self.wait_timeout, "created": self.created}


def document_name(etl_id: str) -> str:
    """The ConfigMap name of a declaration (DNS-1123: lowercase)."""
    return "aisetl-etl-" + etl_id.lower().replace("_", "-")


def to_document(decl: EtlDeclaration, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The ConfigMap-shaped document stored for ``decl``."""
    data = {"id": decl.id, "kind": decl.kind, "communication_type": decl.comm_type,
            "wait_timeout": decl.wait_timeout}
    if decl.kind == "build":
        data.update({"runtime": decl.runtime, "code.py": decl.code, "deps.txt": decl.deps})
    else:
        data["spec.yaml"] = decl.spec
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": document_name(decl.id),
            "labels": {PART_OF: "aisetl", ETL_LABEL: "true", **(labels or {})},
            "annotations": {"aisetl.io/created": repr(decl.created)},
        },
        "data": data,
    }


def from_document(doc: dict[str, Any]) -> EtlDeclaration:
    """Parse a stored (or ``kubectl apply``-ed) declaration document, validating it."""
    data = doc.get("data") or {}
    meta = doc.get("metadata") or {}
    created = 0.0
    try:
        created = float((meta.get("annotations") or {}).get("aisetl.io/created", 0.0))
    except (TypeError, ValueError):
        created = 0.0
    kind = data.get("kind", "")
    if kind == "init":
        decl = parse_init(data.get("spec.yaml", ""), etl_id=data.get("id"))
        # explicit data keys win over the spec's annotations (GitOps users may set either)
        comm = data.get("communication_type") or decl.comm_type
        wt = data.get("wait_timeout") or decl.wait_timeout
        decl = parse_init(decl.spec, etl_id=decl.id, comm_type=comm, wait_timeout=wt)
    elif kind == "build":
        decl = parse_build({
            "id": data.get("id"), "runtime": data.get("runtime", ""),
            "code": data.get("code.py", ""), "dependencies": data.get("deps.txt", ""),
            "communication_type": data.get("communication_type") or "hpush://",
            "wait_timeout": data.get("wait_timeout") or DEFAULT_WAIT_TIMEOUT,
            "encoding": "text",
        })
    else:
        raise InvalidSpec(f"data.kind: {kind!r} is not an ETL kind: use 'build' or 'init'",
                          field="data.kind")
    return EtlDeclaration(**{**decl.__dict__, "created": created})


def _decode(value: Any, field_name: str, encoding: str | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidSpec(f"{field_name}: expected a string (plain text or base64), "
                          f"got {type(value).__name__}", field=field_name)
    if encoding == "text" or value == "":
        return value
    looks_b64 = bool(_B64.match(value)) and len(re.sub(r"\s", "", value)) % 4 == 0
    if encoding == "base64" or looks_b64:
        try:
            text = base64.b64decode(re.sub(r"\s", "", value), validate=True).decode("utf-8")
            if all(c.isprintable() or c in "\n\r\t" for c in text):
                return text
        except (binascii.Error, UnicodeDecodeError) as e:
            if encoding == "base64":
                raise InvalidSpec(f"{field_name}: not valid base64 of UTF-8 text ({e}): "
                                  "send plain text or fix the encoding",
                                  field=field_name) from e
        if encoding == "base64":
            raise InvalidSpec(f"{field_name}: base64 decodes to binary, not text",
                              field=field_name)
    return value


def _comm_type(value: Any, field_name: str) -> str:
    v = "hpush://" if value in (None, "") else str(value).strip()
    if v in ("hpush", "hrev", "hpull"):
        v += "://"
    if v not in COMM_TYPES:
        raise InvalidSpec(f"{field_name}: unknown communication type {value!r}: "
                          "use one of hpush://, hrev://, hpull://", field=field_name)
    return v


def _wait_timeout(value: Any, field_name: str) -> str:
    v = DEFAULT_WAIT_TIMEOUT if value in (None, "") else str(value).strip()
    seconds = parse_duration(v, field_name)
    if seconds <= 0:
        raise InvalidSpec(f"{field_name}: must be positive, e.g. '2m'", field=field_name)
    return v


def _check_python3(code: str) -> None:
    try:
        tree = ast.parse(code, filename="code.py")
    except SyntaxError as e:
        raise InvalidSpec(
            f"code: syntax error at line {e.lineno}: {e.msg}: fix the code and build again",
            field="code",
        ) from e
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if not names & {"transform", "transform_stream"}:
        raise InvalidSpec("code: no top-level 'transform' function: define "
                          "'def transform(input_bytes: bytes) -> bytes'", field="code")


def parse_build(body: Any, comm_type: str | None = None) -> EtlDeclaration:
    """Validate a ``build`` request body (already JSON-decoded)."""
    if not isinstance(body, dict):
        raise InvalidSpec("body: expected a JSON object with 'code' and 'runtime'",
                          field="body")
    known = {"code", "dependencies", "runtime", "id", "name", "wait_timeout",
             "communication_type", "encoding"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidSpec(f"{unknown[0]}: unknown field: use only {', '.join(sorted(known))}",
                          field=unknown[0])
    encoding = body.get("encoding")
    if encoding not in (None, "base64", "text"):
        raise InvalidSpec("encoding: use 'base64' or 'text' (or leave it out)", field="encoding")
    runtime = body.get("runtime")
    if runtime not in RUNTIMES:
        raise InvalidSpec(f"runtime: {runtime!r} is not a runtime: use one of "
                          f"{', '.join(RUNTIMES)}", field="runtime")
    code = _decode(body.get("code"), "code", encoding)
    if not code.strip():
        raise InvalidSpec("code: empty: send the module that defines transform(input_bytes)",
                          field="code")
    if len(code.encode()) > MAX_CODE_BYTES:
        raise InvalidSpec(f"code: larger than {MAX_CODE_BYTES} bytes: ship big code as an "
                          "init container image instead", field="code")
    if runtime == "python3":
        _check_python3(code)
    elif not re.search(r"^(def|class)\s+transform\b|^transform\s*=", code, re.M):
        raise InvalidSpec("code: no top-level 'transform' function: define "
                          "'def transform(input_bytes)'", field="code")
    deps = _decode(body.get("dependencies"), "dependencies", encoding)
    for n, line in enumerate(deps.splitlines(), 1):
        s = line.strip()
        if s.startswith("-"):
            raise InvalidSpec(f"dependencies: line {n}: pip options are not allowed "
                              f"({s.split()[0]}): list requirements only", field="dependencies")
    etl_id = body.get("id") or body.get("name")
    etl_id = validate_etl_id(etl_id) if etl_id else new_etl_id()
    return EtlDeclaration(
        id=etl_id, kind="build", runtime=runtime, code=code, deps=deps,
        comm_type=_comm_type(comm_type or body.get("communication_type"), "communication_type"),
        wait_timeout=_wait_timeout(body.get("wait_timeout"), "wait_timeout"),
    )


def _parse_pod(spec: str) -> tuple[Container, str]:
    try:
        doc = yaml.safe_load(spec)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidSpec(f"spec: not valid YAML{where}: {getattr(e, 'problem', e)}",
                          field="spec") from e
    if not isinstance(doc, dict):
        raise InvalidSpec("spec: expected a Pod manifest (a YAML mapping with 'kind: Pod')",
                          field="spec")
    if doc.get("kind", "Pod") != "Pod":
        raise InvalidSpec(f"kind: {doc.get('kind')!r}: the spec must be 'kind: Pod'",
                          field="kind")
    pod_spec = doc.get("spec")
    if not isinstance(pod_spec, dict):
        raise InvalidSpec("spec.spec: missing: add 'spec: {containers: [...]}'",
                          field="spec.containers")
    containers = pod_spec.get("containers")
    if not isinstance(containers, list) or len(containers) != 1:
        n = len(containers) if isinstance(containers, list) else 0
        raise InvalidSpec(f"spec.containers: has {n} containers: an ETL pod runs exactly one "
                          "container (move helpers into it, or use initContainers)",
                          field="spec.containers")
    c = containers[0]
    if not isinstance(c, dict) or not c.get("image"):
        raise InvalidSpec("spec.containers[0].image: missing: name the transformer image",
                          field="spec.containers[0].image")
    ports = [p for p in (c.get("ports") or []) if isinstance(p, dict) and "containerPort" in p]
    if not ports:
        raise InvalidSpec("spec.containers[0].ports: no containerPort: add "
                          "'ports: [{name: default, containerPort: 80}]' with the port "
                          "your server listens on", field="spec.containers[0].ports")
    port_entry = next((p for p in ports if p.get("name") == "default"), ports[0])
    try:
        port = int(port_entry["containerPort"])
    except (TypeError, ValueError) as e:
        raise InvalidSpec("spec.containers[0].ports[].containerPort: must be a number",
                          field="spec.containers[0].ports") from e
    if not 0 < port < 65536:
        raise InvalidSpec(f"spec.containers[0].ports[].containerPort: {port} is out of range "
                          "1-65535", field="spec.containers[0].ports")
    env: dict[str, str] = {}
    for i, item in enumerate(c.get("env") or []):
        if not isinstance(item, dict) or not item.get("name"):
            raise InvalidSpec(f"spec.containers[0].env[{i}]: each entry needs a 'name'",
                              field="spec.containers[0].env")
        if not ENV_NAME_RE.match(str(item["name"])):
            raise InvalidSpec(f"spec.containers[0].env[{i}].name: {item['name']!r} is not a valid "
                              "environment variable name: use letters, digits and '_', not "
                              "starting with a digit", field=f"spec.containers[0].env[{i}].name")
        if "value" in item:
            env[str(item["name"])] = str(item["value"])
    for key in ("command", "args"):
        if c.get(key) is not None and not isinstance(c.get(key), list):
            raise InvalidSpec(f"spec.containers[0].{key}: must be a list of strings",
                              field=f"spec.containers[0].{key}")
    name = str((doc.get("metadata") or {}).get("name") or "")
    return Container(name=str(c.get("name") or "server"), image=str(c["image"]), port=port,
                     command=[str(x) for x in c.get("command") or []],
                     args=[str(x) for x in c.get("args") or []], env=env), name


def parse_init(spec: str, etl_id: str | None = None, comm_type: str | None = None,
               wait_timeout: str | None = None) -> EtlDeclaration:
    """Validate an ``init`` pod spec; annotations give comm type and wait timeout."""
    if not spec or not spec.strip():
        raise InvalidSpec("spec: empty body: send the pod spec YAML (curl -T spec.yaml)",
                          field="spec")
    _parse_pod(spec)
    doc = yaml.safe_load(spec)
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InvalidSpec("metadata.annotations: must be a mapping",
                          field="metadata.annotations")
    return EtlDeclaration(
        id=validate_etl_id(etl_id) if etl_id else new_etl_id(),
        kind="init",
        spec=spec,
        comm_type=_comm_type(comm_type or annotations.get("communication_type"),
                             "metadata.annotations.communication_type"),
        wait_timeout=_wait_timeout(wait_timeout or annotations.get("wait_timeout"),
                                   "metadata.annotations.wait_timeout"),
    )


__all__ = ["COMM_TYPES", "RUNTIMES", "Container", "EtlDeclaration", "document_name",
           "format_duration", "from_document", "new_etl_id", "parse_build", "parse_init",
           "to_document"]
