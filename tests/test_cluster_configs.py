"""cluster/: launcher YAMLs against Ray's own schema, KubeRay manifests against the RayJob/RayCluster
structure, and the pins of every install path against the environment we test in."""
from __future__ import annotations

import copy
import json
import re
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import torchrec
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"]
RAY_VERSION = ray.__version__
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>[\d.]+)-py311-(?P<platform>cpu|cu\d+)$")
PROJECT_IMAGE_RE = re.compile(r"^(?:[\w.\-/:]+/)?mtrec-dist:[\w.\-]*ray(?P<ray>[\d.]+)-py311-(?P<platform>cpu|cu\d+)$")


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_schema():
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Cluster launcher YAMLs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(name)
    jsonschema.validate(cfg, _ray_schema())  # the file as written
    prepared = prepare_config(copy.deepcopy(cfg))  # what `ray up` does before launching anything
    validate_config(prepared)
    assert prepared["provider"]["type"] == name.split(".")[0]


def test_schema_validation_catches_mistakes():
    cfg = _load("aws.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 8}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    bad = copy.deepcopy(cfg)
    bad["docker"]["imgae"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_content(name):
    cfg = _load(name)
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    gpu_types = [t for t, spec in types.items() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_types and head not in gpu_types, "GPU workers and a CPU head"
    for t in gpu_types:
        assert types[t]["max_workers"] >= 1
    # Images: the official Ray image of exactly our Ray version and Python 3.11; CPU head, CUDA workers.
    head_img = IMAGE_RE.match(cfg["docker"]["head_image"])
    worker_img = IMAGE_RE.match(cfg["docker"]["worker_image"])
    assert head_img and worker_img
    assert head_img["ray"] == worker_img["ray"] == RAY_VERSION
    assert head_img["platform"] == "cpu" and worker_img["platform"].startswith("cu")
    # Setup installs this project with the pinned installer.
    assert any("cluster/setup_node.sh" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/mtrec-dist"] == "."
    # Token auth on every node, the token from a mounted file (never from this repo).
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    token_dirs = [remote for remote, local in cfg["file_mounts"].items() if local == "~/.ray"]
    assert token_dirs == ["/home/ray/.ray"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    # Dashboard on loopback only; nothing binds it to all interfaces.
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (CLUSTER / name).read_text()


# ----------------------------------------------------------------------------------------------------
# KubeRay manifests
# ----------------------------------------------------------------------------------------------------


def _containers(pod_template):
    spec = pod_template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def _check_cluster_spec(spec, where):
    assert spec["rayVersion"] == RAY_VERSION, where
    assert spec["authOptions"]["mode"] == "token", where
    secret = spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head must not be exposed"
    assert "rayStartParams" in head
    pods = [("head", head["template"])]
    assert spec["workerGroupSpecs"], where
    for g in spec["workerGroupSpecs"]:
        for k in ("groupName", "replicas", "minReplicas", "maxReplicas"):
            assert k in g, f"{where}: worker group lacks {k}"
        assert isinstance(g["replicas"], int) and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pods.append((g["groupName"], g["template"]))
    gpus = 0
    for group, tpl in pods:
        for c in _containers(tpl):
            _check_container(c, secret, f"{where}/{group}/{c['name']}")
            gpus += int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus > 0, f"{where}: no GPU workers"
    return secret


def _check_container(c, secret, where):
    m = PROJECT_IMAGE_RE.match(c["image"])
    assert m and m["ray"] == RAY_VERSION, f"{where}: image {c['image']} is not pinned to Ray {RAY_VERSION}"
    res = c["resources"]
    assert res["requests"] and res["limits"], f"{where}: needs resource requests and limits"
    for k, v in res["requests"].items():
        assert k in res["limits"], f"{where}: {k} requested but not limited"
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token", where
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret, "key": "auth_token"}, where
    assert "value" not in env["RAY_AUTH_TOKEN"], f"{where}: the token must come from the Secret"


def test_rayjob_manifest_structure():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    # The entrypoint runs one of our job scripts, from the path the Dockerfile copies the checkout to.
    m = re.search(r"python /home/ray/mtrec-dist/(jobs/\w+\.py)", spec["entrypoint"])
    assert m and (REPO / m.group(1)).exists()
    assert "--storage-path" in spec["entrypoint"]
    yaml.safe_load(spec["runtimeEnvYAML"])
    secret = _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    for c in spec["submitterPodTemplate"]["spec"]["containers"]:
        _check_container(c, secret, f"RayJob/submitter/{c['name']}")


def test_raycluster_manifest_structure():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()))
    assert len(docs) == 1
    rc = docs[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    _check_cluster_spec(rc["spec"], "RayCluster")


@pytest.mark.parametrize("name", KUBERAY)
def test_manifests_expose_nothing_and_commit_no_secret(name):
    text = (CLUSTER / name).read_text()
    for doc in yaml.safe_load_all(text):
        assert doc["kind"] not in ("Service", "Ingress", "Secret", "Route"), f"{name} ships a {doc['kind']}"
    assert "LoadBalancer" not in text and "NodePort" not in text and "Ingress" not in text


# ----------------------------------------------------------------------------------------------------
# Install paths and uploads
# ----------------------------------------------------------------------------------------------------


def _pins(text):
    return {
        "ray": re.search(r'RAY_VERSION="([\d.]+)"|ray\[default,train,data\]==([\d.]+)', text),
        "torch": re.search(r'TORCH_VERSION="([\d.]+)"|"torch==([\d.]+)"', text),
        "fbgemm": re.search(r'FBGEMM_VERSION="([\d.]+)"|fbgemm-gpu-cpu==([\d.]+)', text),
        "torchrec": re.search(r'TORCHREC_VERSION="([\d.]+)"|torchrec==([\d.]+)', text),
    }


def test_node_setup_uses_the_bootstrap_pins_and_order():
    setup = (CLUSTER / "setup_node.sh").read_text()
    boot = (REPO / "scripts" / "bootstrap.sh").read_text()
    got = {k: next(g for g in m.groups() if g) for k, m in _pins(setup).items()}
    want = {k: next(g for g in m.groups() if g) for k, m in _pins(boot).items()}
    assert got == want
    assert got["ray"] == RAY_VERSION and got["torch"] == torch.__version__.split("+")[0]
    assert got["torchrec"] == torchrec.__version__
    # fbgemm before torchrec, torchrec without its dependencies.
    assert setup.index('"$FBGEMM"') < setup.index("--no-deps \"torchrec==")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=(\S+)", dockerfile).group(1)
    assert IMAGE_RE.match(base)["ray"] == RAY_VERSION and "setup_node.sh" in dockerfile


def test_working_dir_upload_excludes_venv_and_git(tmp_path):
    """What `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` uploads, built by Ray's
    own packaging code with the same .gitignore handling and excludes."""
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    pkg = tmp_path / "wd.zip"
    create_package(str(REPO), pkg, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    assert "jobs/_entry.py" in names and "mtrec_dist/cli.py" in names and "cluster/runtime_env.yaml" in names
    for bad in (".venv/", ".git/", "runs/", "__pycache__/"):
        assert not any(n.startswith(bad) or f"/{bad}" in n for n in names), bad
    assert pkg.stat().st_size < 5 * 1024**2
