"""The one stand-in: a kube-apiserver serving only what deploy-index calls, under the chart's RBAC."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import secrets
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# What the stand-in serves (the calls ttt/deploy.py makes), and nothing else.
ROUTES = [
    (r"/apis/apps/v1/namespaces/([^/]+)/statefulsets/([^/]+)", "apps", "statefulsets"),
    (
        r"/apis/apps/v1/namespaces/([^/]+)/statefulsets/([^/]+)/status",
        "apps",
        "statefulsets/status",
    ),
    (r"/api/v1/namespaces/([^/]+)/configmaps/([^/]+)", "", "configmaps"),
]
SERVED = "GET/PATCH statefulsets, GET statefulsets/status, GET configmaps"


def certificate(address: str, names: list[str], folder: Path) -> tuple[bytes, Path, Path]:
    """A CA and a server certificate for `address` and `names`: (CA PEM, cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rehearsal-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    alt = [x509.IPAddress(ipaddress.ip_address(address)), *map(x509.DNSName, names)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    cert_file, key_file = folder / "apiserver.crt", folder / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return ca.public_bytes(pem), cert_file, key_file


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386), what a strategic merge does for maps."""
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


class ApiServer:
    """Authenticates service-account tokens, authorizes by the rendered Roles and RoleBindings,
    and acts on the rehearsal's StatefulSets; every request is logged."""

    def __init__(self, address: str, objects: list[dict], statefulsets: dict, configmaps: dict,
                 folder: Path, names: list[str]) -> None:  # fmt: skip
        self.rbac = objects
        self.statefulsets = statefulsets  # (namespace, name) -> kubelet.StatefulSet
        self.configmaps = configmaps  # (namespace, name) -> data
        self.tokens: dict[str, tuple[str, str]] = {}
        self.requests: list[str] = []
        self.ca_pem, cert, key = certificate(address, names, folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.handle(self, "get")

            def do_PATCH(self) -> None:
                api.handle(self, "patch")

            def do_PUT(self) -> None:
                api.handle(self, "update")

            def do_POST(self) -> None:
                api.handle(self, "create")

            def do_DELETE(self) -> None:
                api.handle(self, "delete")

        self.server = ThreadingHTTPServer((address, 443), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, namespace: str, account: str) -> str:
        value = secrets.token_urlsafe(24)
        self.tokens[value] = (namespace, account)
        return value

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def allowed(self, user: tuple[str, str], verb: str, group: str, resource: str,
                namespace: str, name: str) -> bool:  # fmt: skip
        roles = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o
                 for o in self.rbac if o["kind"] == "Role"}  # fmt: skip
        for binding in (o for o in self.rbac if o["kind"] == "RoleBinding"):
            if binding["metadata"].get("namespace") != namespace:
                continue
            subjects = {(s.get("namespace", namespace), s["name"])
                        for s in binding.get("subjects", []) if s["kind"] == "ServiceAccount"}  # fmt: skip
            role = roles.get((namespace, binding["roleRef"]["name"]))
            if user not in subjects or role is None:
                continue
            for rule in role.get("rules", []):
                if (group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
                        and verb in rule.get("verbs", [])
                        and (not rule.get("resourceNames") or name in rule["resourceNames"])):  # fmt: skip
                    return True
        return False

    def handle(self, h: BaseHTTPRequestHandler, verb: str) -> None:
        path = h.path.split("?")[0]
        scheme, _, token = h.headers.get("Authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""  # the client sends "bearer"
        user = self.tokens.get(token)
        self.requests.append(f"{verb.upper()} {path} as {user}")
        if user is None:
            return self.reply(h, 401, status(401, "Unauthorized", "Unauthorized"))
        for pattern, group, resource in ROUTES:
            m = re.fullmatch(pattern, path)
            if m:
                break
        else:
            return self.reply(h, 404, status(404, "NotFound",
                                             f"{path}: not served by the rehearsal's stand-in "
                                             f"(it serves {SERVED})"))  # fmt: skip
        namespace, name = m[1], m[2]
        kind = resource.split("/")[0]
        if not self.allowed(user, verb, group, resource, namespace, name):
            who = f"system:serviceaccount:{user[0]}:{user[1]}"
            where = f'in API group "{group}" in the namespace "{namespace}"'
            msg = f'{kind}.{group or "core"} "{name}" is forbidden: User "{who}" cannot {verb} resource "{resource}" {where}'
            return self.reply(h, 403, status(403, "Forbidden", msg))
        if kind == "configmaps":
            if verb != "get" or (namespace, name) not in self.configmaps:
                return self.reply(h, 404, status(404, "NotFound", f'configmaps "{name}" not found'))
            return self.reply(h, 200, {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
                "data": self.configmaps[(namespace, name)],
            })  # fmt: skip
        sts = self.statefulsets.get((namespace, name))
        if sts is None:
            return self.reply(
                h, 404, status(404, "NotFound", f'statefulsets.apps "{name}" not found')
            )
        if verb == "patch":
            length = int(h.headers.get("Content-Length") or 0)
            body = json.loads(h.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                return self.reply(h, 415, status(415, "UnsupportedMediaType", "JSON patch"))
            spec = merge(sts.obj["spec"], body.get("spec", {}))
            if spec["template"] != sts.obj["spec"]["template"]:
                sts.patch(spec["template"])
        elif verb != "get":
            return self.reply(h, 405, status(405, "MethodNotAllowed", verb))
        return self.reply(h, 200, self.statefulset_json(sts))

    @staticmethod
    def statefulset_json(sts: Any) -> dict[str, Any]:
        meta = {**sts.obj["metadata"], "generation": sts.generation,
                "resourceVersion": str(sts.generation), "uid": f"uid-{sts.name}"}  # fmt: skip
        return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
                "spec": sts.obj["spec"], "status": sts.status()}  # fmt: skip

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip
