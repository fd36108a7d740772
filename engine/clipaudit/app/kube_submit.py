"""``python -m clipaudit.app.kube_submit MANIFEST``: create the Kubernetes object of a YAML
manifest (the nightly RayJob) from inside a pod, as ``kubectl create -f`` would.

deploy/cronjob.yaml runs this in clipaudit's own image, so the scheduled job needs no third-party
kubectl image (whose tags come and go). It uses the pod's service account (its token, CA
certificate and namespace under ``/var/run/secrets/kubernetes.io/serviceaccount``) and the API
server the pod's environment names, and POSTs the manifest as JSON; a ``generateName`` gets a
fresh name for every run. Only the standard library and PyYAML.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def object_url(api_server: str, manifest: dict[str, Any], namespace: str) -> str:
    """Where a namespaced object of the manifest's kind is created: ``/api/v1/…`` for the core
    group, ``/apis/<group>/<version>/…`` otherwise; the plural is the lower-cased kind + "s"
    (true of RayJob, RayCluster, Job, CronJob, ConfigMap; not of every kind)."""
    api_version, kind = manifest["apiVersion"], manifest["kind"]
    prefix = "api" if "/" not in api_version else "apis"
    return f"{api_server.rstrip('/')}/{prefix}/{api_version}/namespaces/{namespace}/{kind.lower()}s"


def create(manifest: dict[str, Any], api_server: str, token: str, namespace: str,
           context: ssl.SSLContext | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """POST the manifest; returns the created object (its ``metadata.name`` is the generated one)."""
    namespace = manifest.get("metadata", {}).get("namespace", namespace)
    request = urllib.request.Request(
        object_url(api_server, manifest, namespace), data=json.dumps(manifest).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                 "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        raise RuntimeError(f"creating the {manifest['kind']} failed: HTTP {e.code} {e.reason}: {detail}") from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m clipaudit.app.kube_submit MANIFEST.yaml", file=sys.stderr)
        return 2
    manifest = yaml.safe_load(Path(args[0]).read_text())
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        print("error: not inside a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset)", file=sys.stderr)
        return 2
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))
    created = create(manifest, f"https://{host}:{port}", (ACCOUNT / "token").read_text().strip(),
                     (ACCOUNT / "namespace").read_text().strip(), context)
    print(f"created {manifest['kind']} {created['metadata']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
