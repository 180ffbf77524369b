"""infra/: every YAML validates against the schema its system uses (KubeRay CRDs strictly, the
Kubernetes API through kubernetes-validate, Ray's own cluster-launcher validation), the pieces
agree with each other, and a manifest runs through `ray job submit` on a local Ray head."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.manifest import MANIFESTS_DIR, load_manifest
from tests.harness.cluster import LocalCluster, ray_env
from tests.helpers import (
    free_port,
)

ROOT = Path(__file__).resolve().parents[2]


INFRA = ROOT / "infra"


# The KubeRay CRDs ship in shared/, beside the checkout or inside it.
CRDS = (
    next(
        (p for p in (ROOT.parent / "shared", ROOT / "shared") if (p / "reference" / "kuberay-crds").is_dir()),
        ROOT.parent / "shared",
    )
    / "reference"
    / "kuberay-crds"
)


K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests target (CronJob timeZone is GA since 1.27)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strict(schema: dict) -> dict:
    """A CRD schema where unknown fields are errors, as `kubectl --validate=strict` treats them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = crd_schema(kind)
    return jsonschema.validators.validator_for(schema)(schema)


def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema = strict(v1["schema"]["openAPIV3Schema"])
            schema["properties"]["apiVersion"]["const"] = "ray.io/v1"
            schema["properties"]["kind"]["const"] = kind
            return schema
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


def validate(doc: dict) -> None:
    """KubeRay kinds against their CRD, everything else against the Kubernetes API schema."""
    if doc["apiVersion"].startswith("ray.io/"):
        error = jsonschema.exceptions.best_match(crd_validator(doc["kind"]).iter_errors(doc))
        if error is not None:
            raise error
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def rendered_nightly(run_date: str) -> dict:
    env = os.environ | {"RENDER_ONLY": "1", "RUN_DATE": run_date}
    out = subprocess.run(
        ["sh", str(INFRA / "kuberay" / "nightly-submit.sh")], env=env, capture_output=True, text=True, check=True
    )
    return yaml.safe_load(out.stdout)


KUBE_FILES = sorted((INFRA / "kuberay").glob("*.yaml"))


@pytest.mark.parametrize("path", KUBE_FILES, ids=lambda p: p.name)
def test_every_kubernetes_yaml_validates_strictly(path):
    found = docs(path)
    assert found, f"{path} holds no documents"
    for doc in found:
        validate(doc)


def test_validation_rejects_unknown_and_misplaced_fields():
    """The checks above can fail: a misspelt RayJob field, and a CronJob field at the wrong level."""
    import kubernetes_validate

    (rayjob,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    bad = copy.deepcopy(rayjob)
    bad["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate(bad)
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        validate(bad)
    cron = next(d for d in docs(INFRA / "kuberay" / "nightly-cronjob.yaml") if d["kind"] == "CronJob")
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["schedule"] = "0 2 * * *"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_rayjob_steers_each_stage_to_a_worker_group_with_weights_read_only_and_no_keys():
    (rayjob,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["backoffLimit"] <= 3
    assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
    manifest_path = spec["entrypoint"].split()[2]
    manifest = load_manifest(MANIFESTS_DIR / Path(manifest_path).name, run_date="2026-11-22")
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    declared = {k: float(v) for g in groups.values() for k, v in g.get("resources", {}).items()}
    for pool_name, (stages, pool) in manifest.model_pools().items():
        assert pool.resources, f"{pool_name} has no resources: its pool could land on any group"
        for name, amount in pool.resources.items():
            assert 0 < amount <= declared[name], f"{pool_name} asks {name}={amount}; groups declare {declared}"
        # the pool's actors fit the groups' nodes together
        nodes = sum(g["maxReplicas"] for g in groups.values() if pool.resources.keys() <= g.get("resources", {}).keys())
        assert (pool.max_pool_size or pool.pool_size) * max(pool.resources.values()) <= nodes
        for stage in stages:
            assert getattr(manifest, stage).model.startswith("/models/"), f"{stage} does not read the mounted weights"
    for group in groups.values():
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts["/models"]["readOnly"] is True
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in pod["containers"][0]["env"]
    text = "\n".join(p.read_text() for p in KUBE_FILES)
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)", text)
    (sa,) = docs(INFRA / "kuberay" / "serviceaccount.yaml")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_only_the_staging_job_sees_the_hub_token():
    for path in KUBE_FILES:
        holders = [line for line in path.read_text().splitlines() if "hf-token" in line and "secretKeyRef" in line]
        assert bool(holders) == (path.name == "stage-models-job.yaml"), path.name


def test_nightly_rayjob_is_named_for_its_date_and_renders_that_dates_output():
    night = rendered_nightly("2026-11-22")
    validate(night)
    assert night["metadata"]["name"] == "ifrender-nightly-20261122"
    assert "--run-date 2026-11-22" in night["spec"]["entrypoint"]
    (base,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    assert night["spec"]["rayClusterSpec"] == base["spec"]["rayClusterSpec"]
    # The entrypoint, run as the driver would, writes to that night's prefix.
    args = night["spec"]["entrypoint"].split()
    manifest = load_manifest(MANIFESTS_DIR / Path(args[2]).name, run_date=args[args.index("--run-date") + 1])
    assert manifest.output.path.endswith("/2026-11-22")
    assert rendered_nightly("2026-11-23")["metadata"]["name"] != night["metadata"]["name"]
    bad = subprocess.run(
        ["sh", str(INFRA / "kuberay" / "nightly-submit.sh")],
        env=os.environ | {"RENDER_ONLY": "1", "RUN_DATE": "tonight"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "expected YYYY-MM-DD" in bad.stderr


def test_raycronjob_runs_the_same_job_as_the_rayjob():
    (cron,) = docs(INFRA / "kuberay" / "raycronjob.yaml")
    (base,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    assert cron["spec"]["jobTemplate"] == base["spec"]
    assert cron["spec"]["schedule"] == "0 2 * * *"


def test_ray_is_locked_down_in_every_config():
    """Token auth on every cluster the project starts, the dashboard reached only through an
    authenticated path (a port-forward or the launcher's SSH tunnel, then the token), S3 by role."""
    for name in ("rayjob.yaml", "raycronjob.yaml"):
        (doc,) = docs(INFRA / "kuberay" / name)
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "ifrender-ray-token"}, name
    assert rendered_nightly("2026-11-22")["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    # Nothing publishes the dashboard or turns auth off.
    for path in KUBE_FILES:
        for doc in docs(path):
            assert doc["kind"] not in ("Ingress", "Service"), f"{path.name} exposes a {doc['kind']}"
        assert "RAY_AUTH_MODE" not in path.read_text() or "disabled" not in path.read_text(), path.name
    launcher = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    options = launcher["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options
    token_path = next(o.split("=", 1)[1] for o in options if o.startswith("-e RAY_AUTH_TOKEN_PATH="))
    assert any(o.startswith("-v ") and o.split(":")[1] == token_path and o.endswith(":ro") for o in options)
    assert any("secretsmanager get-secret-value" in c and "-m 0400" in c for c in launcher["initialization_commands"])
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in (INFRA / "aws" / "cluster.yaml").read_text()
    assert launcher["worker_start_ray_commands"]
    text = "\n".join(p.read_text() for p in [*KUBE_FILES, INFRA / "aws" / "cluster.yaml"])
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|aws_secret_access_key", text)
    assert "IamInstanceProfile" in (INFRA / "aws" / "cluster.yaml").read_text()


def test_the_nightly_deadline_and_stop_follow_from_the_plan():
    """The RayJob's night (activeDeadlineSeconds) and its entrypoint's --stop-after are what
    `ifrender plan` gives for cluster.yaml on the GPU group (8 nodes of one 48 GB GPU)."""
    from jobs.plan.costs import flops_profile
    from jobs.plan.schedule import nightly
    from jobs.plan.search import plan

    (rayjob,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    spec = rayjob["spec"]
    args = spec["entrypoint"].split()
    manifest = load_manifest(MANIFESTS_DIR / Path(args[2]).name, run_date="2026-11-22")
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "g6e.xlarge"  # 1 x L40S 48 GB
    (_, pool), *_ = manifest.model_pools().values()
    assert pool.max_pool_size == gpu["maxReplicas"]
    chosen = plan(flops_profile(manifest), gpu["maxReplicas"], 48)
    chunk = manifest.ray.chunk_shards * manifest.input.shard_size
    stop, per_night = nightly(chosen.images_per_hour, chunk, spec["activeDeadlineSeconds"])
    assert int(args[args.index("--stop-after") + 1]) == stop
    assert per_night > 0 and spec["activeDeadlineSeconds"] <= 12 * 3600  # one night
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "plan", str(MANIFESTS_DIR / "cluster.yaml"), "--gpus", "8"]
        + ["--gpu-memory", "48", "--images", "1000000", "--night-hours", str(spec["activeDeadlineSeconds"] / 3600)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert f"--stop-after {stop}" in out.stdout and "activeDeadlineSeconds: 28800" in out.stdout, out.stdout


def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    # Nothing of the launcher's AWS defaults (pip-installing Ray) runs on top of the image.
    assert not any("pip install" in c for c in config["setup_commands"] + config["worker_setup_commands"])
    types = config["available_node_types"]
    declared = {k for t in types.values() for k in t.get("resources", {})}
    manifest = load_manifest(MANIFESTS_DIR / "cluster.yaml", run_date="2026-11-22")
    wanted = {k for _, pool in manifest.model_pools().values() for k in pool.resources}
    assert wanted
    assert wanted <= declared
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu"]["min_wrkers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wrkers"):
        validate_config(prepare_config(bad))


def test_dockerfile_pins_the_versions_this_project_is_tested_with():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\S+)-py(\d)(\d+)-gpu", text)
    assert base and base.group(1) == version("ray"), "base image Ray differs from the installed Ray"
    assert (base.group(2), base.group(3)) == tuple(str(v) for v in sys.version_info[:2])
    assert f"rayproject/ray:{version('ray')}-py311-cpu" in text  # the documented CPU variant
    torch_pin = re.search(r"torch==(\S+)", text).group(1)
    assert torch_pin == version("torch").split("+")[0]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "ray"):
        (pin,) = [d for d in deps if re.match(rf"{name}(\[[^\]]*\])?==", d)]
        assert pin.split("==")[1] == version(name).split("+")[0], pin


@pytest.mark.slow
def test_ray_job_submit_runs_local_tiny_on_a_local_head(tmp_path):
    """The cluster path end to end: a Ray head on 127.0.0.1, the job submitted through its job
    server (the dashboard), the driver joining with RAY_ADDRESS as on a cluster."""
    ray_bin = Path(sys.executable).parent / "ray"
    dashboard = free_port()
    env = ray_env() | {"PATH": f"{ray_bin.parent}:{os.environ['PATH']}"}
    cluster = LocalCluster(head_cpus=8, dashboard_port=dashboard)  # ended by its own processes, not `ray stop`
    out = tmp_path / "out"
    try:
        submit = [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--"]
        submit += ["ifrender", "run", str(MANIFESTS_DIR / "local-tiny.yaml"), f"--set=output.path={out}", "--quiet"]
        # The head's job agent comes up after `ray start` returns: wait for it rather than race it.
        deadline = time.monotonic() + 120
        while True:
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in result.stdout + result.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        cluster.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    index = json.loads((out / "index.json").read_text())
    prompts = [p for p in (MANIFESTS_DIR / "prompts" / "local-tiny.txt").read_text().splitlines() if p.strip()]
    assert index["rows"] == index["ok"] == len(prompts)
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == len(prompts)


def test_pods_give_a_stop_signal_the_time_the_drain_and_the_driver_need():
    """SIGTERM, then terminationGracePeriodSeconds before SIGKILL: Ray's node drain
    (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) and the driver's grace (ray.stop_grace_s) fit inside it."""
    (job,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    manifest = load_manifest(MANIFESTS_DIR / "cluster.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        grace = template["spec"]["terminationGracePeriodSeconds"]
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        assert manifest.ray.stop_grace_s < drain < grace, (container["name"], grace, drain)


def kuberay_deletion_problems(spec: dict) -> list[str]:
    """What KubeRay's own RayJob validation (validateDeletionConfiguration, v1.5+) refuses of a
    deletionStrategy: rules beside shutdownAfterJobFinishes or the legacy fields, a condition
    without exactly one of jobStatus and jobDeploymentStatus, DeleteWorkers on an autoscaling
    cluster, a repeated rule, and TTLs out of the order workers <= cluster <= self."""
    rules = spec.get("deletionStrategy", {}).get("deletionRules", [])
    problems = []
    if rules and spec.get("shutdownAfterJobFinishes"):
        problems.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    if rules and {"onSuccess", "onFailure"} & set(spec["deletionStrategy"]):
        problems.append("legacy onSuccess/onFailure beside deletionRules")
    autoscaling = spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling")
    ttls: dict[tuple, dict[str, int]] = {}
    for i, rule in enumerate(rules):
        condition = rule["condition"]
        if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
            problems.append(f"rule {i}: exactly one of jobStatus and jobDeploymentStatus")
        if autoscaling and rule["policy"] == "DeleteWorkers":
            problems.append(f"rule {i}: DeleteWorkers on an autoscaling cluster")
        key = (condition.get("jobStatus"), condition.get("jobDeploymentStatus"))
        if rule["policy"] in ttls.setdefault(key, {}):
            problems.append(f"rule {i}: a second {rule['policy']} for {key}")
        ttls[key][rule["policy"]] = condition.get("ttlSeconds", 0)
    for key, by_policy in ttls.items():
        order = [by_policy[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
        if order != sorted(order):
            problems.append(f"{key}: TTLs must grow from workers to cluster to self, found {by_policy}")
    return problems


def test_the_documented_deletion_rules_fit_the_crd_and_kuberays_validation():
    """docs/deployment.md's deletionRules, put in place of rayjob.yaml's shutdown fields: valid
    against the v1.7 CRD and KubeRay's own rules; a failed job keeps its head longer than a
    successful one. The checker itself refuses what KubeRay refuses."""
    import re

    text = (INFRA.parent / "docs" / "deployment.md").read_text()
    block = yaml.safe_load(re.search(r"<!-- deletion-rules -->\n```yaml\n(.*?)```", text, re.S)[1])
    (job,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    spec = {k: v for k, v in job["spec"].items() if k not in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished")}
    job = job | {"spec": spec | block}
    validate(job)
    assert kuberay_deletion_problems(job["spec"]) == []
    rules = {
        (r["condition"].get("jobStatus"), r["policy"]): r["condition"]["ttlSeconds"]
        for r in block["deletionStrategy"]["deletionRules"]
    }
    assert rules[("FAILED", "DeleteCluster")] > rules[("SUCCEEDED", "DeleteCluster")]
    both = job["spec"] | {"shutdownAfterJobFinishes": True}
    assert "shutdownAfterJobFinishes and deletionRules are mutually exclusive" in kuberay_deletion_problems(both)
    workers = {"condition": {"jobStatus": "FAILED", "ttlSeconds": 0}, "policy": "DeleteWorkers"}
    with_workers = job["spec"] | {
        "deletionStrategy": {"deletionRules": [*block["deletionStrategy"]["deletionRules"], workers]}
    }
    assert any("DeleteWorkers on an autoscaling cluster" in p for p in kuberay_deletion_problems(with_workers))
