"""The Kubernetes manifests: strict validation against the schemas bundled with kubernetes-validate,
the kustomization, cross-references between the files, and resources sized for a GPT4All-J worker."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from server.settings import Settings
from tests.deploy.common import image_env, final, manifests, k8s, ROOT, K8S, SETTING_VARS, WORKER_EXIT_MARGIN


# ---- Kubernetes ------------------------------------------------------------------------------------

def test_k8s_manifests_validate_strictly():
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    versions = ["1.29.0", latest_version()]
    checked = 0
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "Kustomization":
                continue
            for v in versions:
                kubernetes_validate.validate(doc, v, strict=True)
            checked += 1
    assert checked == 7
    # strict validation does reject an unknown field
    dep = copy.deepcopy(k8s("Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, latest_version(), strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files
    container = k8s("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert [i["name"] for i in kust["images"]] == [container["image"].split(":")[0]]


def test_k8s_cross_references():
    dep, svc, hpa = k8s("Deployment"), k8s("Service"), k8s("HorizontalPodAutoscaler")
    cm, secret, pvc = k8s("ConfigMap"), k8s("Secret"), k8s("PersistentVolumeClaim")
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # selectors
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items()
               for c in pod.get("topologySpreadConstraints", []))
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    # port and settings: one port everywhere
    assert ports == {"http": int(cm["data"]["GPT4ALL_J_PORT"])}
    assert cm["data"]["GPT4ALL_J_PORT"] == image_env()["GPT4ALL_J_PORT"]
    assert cm["data"]["GPT4ALL_J_HOST"] == "0.0.0.0"
    assert set(cm["data"]) <= SETTING_VARS, set(cm["data"]) - SETTING_VARS
    # probes
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    assert all(p["port"] in ports or p["port"] in ports.values() for p in probes.values())
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= Settings.model_fields["load_timeout"].default
    # references to the ConfigMap, Secret and PVC
    assert container["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    (key_env,) = [e for e in container["env"] if e["name"] == "GPT4ALL_J_API_KEYS"]
    assert "GPT4ALL_J_API_KEYS" in SETTING_VARS
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "PLACEHOLDER" in (K8S / "secret.yaml").read_text()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    models = volumes[mounts["/models"]]
    assert models["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert json.loads(final("VOLUME")[-1]) == ["/models", "/data"]
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]]
    assert "/data" in mounts and "emptyDir" in volumes[mounts["/data"]]  # the stored responses
    # no Service variables named like settings (a Service `gpt4all-j` would set GPT4ALL_J_PORT)
    assert pod["enableServiceLinks"] is False
    # security: the image's non-root user, read-only root filesystem
    uid = int(final("USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["fsGroup"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # termination: preStop drain + the server's shutdown grace + the workers' exit
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(cm["data"]["GPT4ALL_J_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + WORKER_EXIT_MARGIN


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(\w*)", quantity)
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_k8s_resources_fit_a_gpt4all_j_worker():
    """The Deployment's comment, as arithmetic: weights + KV cache + scratch + processes."""
    registry = yaml.safe_load((ROOT / "model_registry.yaml").read_text())
    groovy = next(m for m in registry["models"] if m["id"] == "ggml-gpt4all-j-v1.3-groovy")
    weights = groovy["size"]  # 3,785,248,281 B
    n_ctx, n_layer, n_embd = groovy["context_length"], 28, 4096
    kv = n_ctx * n_layer * n_embd * 2 * 2  # K and V, f16
    assert kv == 939_524_096
    scratch, processes = 256 * 2**20, 200 * 2**20  # ggml eval buffer; server + worker interpreters
    need = groovy["workers"] * (weights + kv + scratch) + processes
    container = k8s("Deployment")["spec"]["template"]["spec"]["containers"][0]
    request = _bytes(container["resources"]["requests"]["memory"])
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert need <= request < limit, (need / 2**30, request / 2**30, limit / 2**30)
    # a container sees the whole node's CPUs, so the thread count must come from the ConfigMap
    threads = groovy.get("threads") or int(k8s("ConfigMap")["data"]["GPT4ALL_J_DEFAULT_THREADS"])
    assert threads >= 1
    assert float(container["resources"]["requests"]["cpu"]) == groovy["workers"] * threads
    assert "cpu" not in container["resources"].get("limits", {})
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"  # relative to the CPU request above
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert _bytes(k8s("PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"]) > weights
