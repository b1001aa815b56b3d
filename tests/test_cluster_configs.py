"""The cluster configs of cluster/ (issue 6), checked without a cluster or a network.

- The Ray cluster launcher configs (cluster/*.yaml) validate against the JSON schema inside the
  installed ray package and pass Ray's own preparation (`ray up` does both first); a copy with an
  unknown key or a wrong type is rejected.
- Versions follow the project: the Ray image, the pinned ray in setup commands, KubeRay's
  rayVersion, the image of cluster/Dockerfile and its tag all name the installed ray; the MLflow
  server image names the installed mlflow.
- Every node installs this package; every KubeRay manifest has what KubeRay requires; the RayJob
  runs an `orchestrate launch` that the CLI accepts; the README's orchestrate commands parse.
- Security invariants: the dashboard is on the head's loopback (VMs) or behind a ClusterIP Service
  (Kubernetes: KubeRay binds it to 0.0.0.0 inside the pod so that the Service reaches it), token
  authentication everywhere, no LoadBalancer / NodePort / Ingress / host port, MLflow published
  on 127.0.0.1 by default, no literal secret (credentials come from the environment).
The checks are functions returning problems, and each is shown to catch a broken copy.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import click
import jsonschema
import mlflow
import pytest
import ray
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = CLUSTER / "kuberay"
MLFLOW_DIR = CLUSTER / "mlflow"
RAY_VERSION = ray.__version__
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
VERSION_TOKEN = r"(?<![\d.]){}(?![\d.])"


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def load_all(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def names_version(text: str, version: str) -> bool:
    return re.search(VERSION_TOKEN.format(re.escape(version)), text) is not None


def ray_start_commands(cfg: dict, key: str) -> list[list[str]]:
    """The `ray start` invocations among a launcher's start commands, as argument lists (with any
    VAR=value prefix kept), each command split at `;` and `&&`."""
    found = []
    for cmd in cfg.get(key, []):
        for part in re.split(r";|&&", cmd):
            args = shlex.split(part)
            i = next((i for i in range(len(args) - 1) if args[i:i + 2] == ["ray", "start"]), None)
            if i is not None:
                found.append(args)
    return found


def flag(args: list[str], name: str) -> str | None:
    """The value of --name (as --name=V or --name V) in an argument list."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


# ---------------------------------------------------------------- Ray cluster launcher configs

def launcher_problems(cfg: dict) -> list[str]:
    """What is wrong with a launcher config beyond Ray's schema: versions, install, security."""
    problems = []
    images = [v for k, v in cfg.get("docker", {}).items() if k.endswith("image")]
    images += [nt["docker"][k] for nt in cfg["available_node_types"].values()
               for k in nt.get("docker", {}) if k.endswith("image")]
    if not images:
        problems.append("no docker image")
    for image in images:
        if not re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+(-[a-z0-9]+)?", image):
            problems.append(f"docker image {image} is not rayproject/ray:{RAY_VERSION}-py3XX-...")
    setup = list(cfg.get("setup_commands", []))    # run on every node (head and workers)
    pins = [m for c in setup for m in re.findall(r"ray(?:\[[^\]]*\])?==([\w.]+)", c)]
    if not pins or any(p != RAY_VERSION for p in pins):
        problems.append(f"setup_commands pin ray {pins or 'nowhere'}, not =={RAY_VERSION}")
    # this package: the wheel built into ./dist/cluster, mounted on every node and pip-installed
    mounts = cfg.get("file_mounts", {})
    wheel_dirs = [remote for remote, local in mounts.items() if PurePosixPath(local) == PurePosixPath("dist/cluster")]
    wheel = PROJECT.replace("-", "_") + "-*.whl"
    installs = [c for c in setup if "pip install" in c
                and any(f"{d.rstrip('/')}/{wheel}" in c for d in wheel_dirs)]
    if not installs:
        problems.append(f"no setup command pip-installs {wheel} from the mount of ./dist/cluster")
    # token authentication: the token file on every node and every `ray start` in token mode
    if "~/.ray/auth_token" not in mounts:
        problems.append("~/.ray/auth_token is not mounted on the nodes")
    heads = ray_start_commands(cfg, "head_start_ray_commands")
    workers = ray_start_commands(cfg, "worker_start_ray_commands")
    if not heads or not workers:
        problems.append("no `ray start` in head_start_ray_commands or worker_start_ray_commands")
    for args in heads + workers:
        if "RAY_AUTH_MODE=token" not in args[:args.index("ray")]:
            problems.append(f"`{' '.join(args)}` runs without RAY_AUTH_MODE=token")
    for args in heads:
        host = flag(args, "--dashboard-host")
        if host not in ("127.0.0.1", "localhost"):
            problems.append(f"the head's dashboard (its job API) listens on {host or 'an unstated host'}, "
                            f"not the head's loopback")
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or \
                any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])):
            problems.append(f"security group rule {rule} opens ports to the internet")
    # GCP: resources are not auto-detected; the GPU type lives in the project and zone of the provider
    for name, nt in cfg["available_node_types"].items():
        for acc in nt["node_config"].get("guestAccelerators", []):
            want = f"projects/{cfg['provider']['project_id']}/zones/{cfg['provider']['availability_zone']}/"
            if not acc["acceleratorType"].startswith(want):
                problems.append(f"{name}: {acc['acceleratorType']} is not in {want}")
            if nt.get("resources", {}).get("GPU") != acc["acceleratorCount"]:
                problems.append(f"{name}: resources.GPU {nt.get('resources', {}).get('GPU')} != "
                                f"acceleratorCount {acc['acceleratorCount']}")
    return problems


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_validates_against_the_schema_in_ray(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert {p.name for p in LAUNCHERS} >= {"aws.yaml", "gcp.yaml"}
    cfg = load(path)
    jsonschema.validate(cfg, ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))     # what `ray up` checks before it calls the cloud
    assert launcher_problems(cfg) == []
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}                   # nothing but the driver on the head
    assert [nt.get("min_workers", 0) for n, nt in cfg["available_node_types"].items()
            if n != cfg["head_node_type"]] == [1]            # one GPU worker up when a sweep starts


def test_a_broken_launcher_config_is_rejected():
    cfg = load(CLUSTER / "aws.yaml")
    schema = ray_schema()
    unknown = copy.deepcopy(cfg)
    unknown["available_node_types"]["gpu"]["min_worker"] = 1         # a typo for min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(unknown, schema)
    wrong_type = copy.deepcopy(cfg)
    wrong_type["available_node_types"]["gpu"]["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="four"):
        jsonschema.validate(wrong_type, schema)

    def broken(edit) -> list[str]:
        c = copy.deepcopy(cfg)
        edit(c)
        return launcher_problems(c)

    old = "2.9.3"
    assert any("docker image" in p for p in broken(
        lambda c: c["docker"].update(image=f"rayproject/ray:{old}-py311-gpu")))
    assert any("pin ray" in p for p in broken(lambda c: c.update(setup_commands=[
        s.replace(f"=={RAY_VERSION}", f"=={old}") for s in c["setup_commands"]])))
    assert any("pip-installs" in p for p in broken(lambda c: c["file_mounts"].pop("~/orchestrate-wheel")))
    assert any("dashboard" in p for p in broken(lambda c: c.update(head_start_ray_commands=[
        s.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0") for s in c["head_start_ray_commands"]])))
    assert any("RAY_AUTH_MODE" in p for p in broken(lambda c: c.update(worker_start_ray_commands=[
        s.replace("RAY_AUTH_MODE=token ", "") for s in c["worker_start_ray_commands"]])))
    assert any("internet" in p for p in broken(lambda c: c["provider"].update(security_group={"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]})))
    gcp = load(CLUSTER / "gcp.yaml")
    gcp["available_node_types"]["gpu"]["resources"]["GPU"] = 2
    assert any("acceleratorCount" in p for p in launcher_problems(gcp))


def test_the_launchers_wheel_is_built_where_they_mount_it():
    """README step A.3 builds the wheel that the launchers mount (./dist/cluster) and install."""
    readme = (CLUSTER / "README.md").read_text()
    assert "pip wheel -q --no-deps -w dist/cluster ." in readme
    for path in LAUNCHERS:
        assert load(path)["file_mounts"]["~/orchestrate-wheel"] == "./dist/cluster"


# ---------------------------------------------------------------- KubeRay

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def pod_containers(group: dict) -> list[dict]:
    return group.get("template", {}).get("spec", {}).get("containers", [])


def image_problems(image: str, where: str) -> list[str]:
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    return [] if names_version(tag, RAY_VERSION) else [f"{where}: image {image} does not name ray {RAY_VERSION}"]


def raycluster_spec_problems(spec: dict, where: str) -> list[str]:
    """What KubeRay (>= 1.5.1) requires of a RayClusterSpec, and this project's invariants."""
    problems = []
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not the installed ray {RAY_VERSION}")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{where}: authOptions.mode is not token")
    head = spec.get("headGroupSpec") or {}
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{i}]", g) for i, g in
                                          enumerate(spec.get("workerGroupSpecs") or [])]
    for name, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.{name}: rayStartParams must be a mapping of strings, got {params!r}")
        containers = pod_containers(group)
        if not containers or not all(c.get("name") and c.get("image") for c in containers):
            problems.append(f"{where}.{name}: template.spec.containers needs a container with name and image")
        for c in containers:
            problems += image_problems(c.get("image", ""), f"{where}.{name}")
            if any("hostPort" in p for p in c.get("ports", [])):
                problems.append(f"{where}.{name}: a hostPort exposes the container on its node")
        if group.get("template", {}).get("spec", {}).get("hostNetwork"):
            problems.append(f"{where}.{name}: hostNetwork puts Ray's ports on the node's addresses")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or \
            (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}: the head Service (dashboard, job API) is not of type ClusterIP")
    if head.get("enableIngress"):
        problems.append(f"{where}: enableIngress exposes the dashboard")
    if not spec.get("workerGroupSpecs"):
        problems.append(f"{where}: no workerGroupSpecs")
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        w = f"{where}.workerGroupSpecs[{i}]"
        if not g.get("groupName"):
            problems.append(f"{w}: no groupName")
        counts = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(n, int) and n >= 0 for n in counts) or not counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{w}: needs minReplicas <= replicas <= maxReplicas, got {counts}")
        for c in pod_containers(g):
            res = c.get("resources", {})
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus is None or int(gpus) < 1:
                problems.append(f"{w}: container {c.get('name')} has no nvidia.com/gpu limit")
            elif "nvidia.com/gpu" in res.get("requests", {}) and res["requests"]["nvidia.com/gpu"] != gpus:
                problems.append(f"{w}: nvidia.com/gpu requests != limits (Kubernetes refuses that)")
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs") or []]
    if len(set(names)) != len(names):
        problems.append(f"{where}: duplicate groupName")
    return problems


def rayjob_problems(job: dict) -> list[str]:
    from orchestrator.cli import launch

    problems = []
    spec = job.get("spec", {})
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        problems.append("RayJob needs rayClusterSpec or clusterSelector")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("RayJob does not set shutdownAfterJobFinishes: true")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("ttlSecondsAfterFinished < 0")
    args = shlex.split(spec.get("entrypoint", ""))
    if args[:2] != ["orchestrate", "launch"]:
        return problems + [f"the entrypoint {spec.get('entrypoint')!r} does not run `orchestrate launch`"]
    try:
        ctx = launch.make_context("launch", args[2:])   # what the CLI makes of it
    except click.ClickException as e:  # an unknown option, a missing value...
        return problems + [f"`orchestrate launch` refuses the entrypoint's arguments: {e}"]
    # only what the entrypoint says (not this machine's ORCHESTRATE_STORAGE, MLFLOW_TRACKING_URI...)
    params = {k: (v if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE else None)
              for k, v in ctx.params.items()}
    if params["address"] != "auto":
        problems.append("the entrypoint does not join the job's cluster (--address auto)")
    if not params["root"] or not PurePosixPath(params["root"]).is_absolute():
        problems.append("the entrypoint's --root is not an absolute path")
    if not params["storage"] or "://" not in params["storage"]:
        problems.append("the entrypoint has no shared --storage URI (results would die with the cluster)")
    if not params["tracking_uri"] or urlsplit(params["tracking_uri"]).scheme not in ("http", "https"):
        problems.append("the entrypoint logs to no MLflow tracking server")
    elif urlsplit(params["tracking_uri"]).password:
        problems.append("the tracking URI holds a password")
    head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec", {})
    mounts = [m["mountPath"] for c in pod_containers(head) for m in c.get("volumeMounts", [])]
    if spec.get("rayClusterSpec") and not any(
            params["spec"] and PurePosixPath(params["spec"]).is_relative_to(m) for m in mounts):
        problems.append(f"the spec {params['spec']} is on no volume of the head container ({mounts})")
    return problems


def test_kuberay_manifests_have_what_kuberay_requires():
    cluster = load(KUBERAY / "raycluster.yaml")
    job = load(KUBERAY / "rayjob.yaml")
    for doc, kind, max_name in ((cluster, "RayCluster", 53), (job, "RayJob", 47)):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
        name = doc["metadata"]["name"]
        assert DNS1035.fullmatch(name) and len(name) <= max_name, name
    assert raycluster_spec_problems(cluster["spec"], "RayCluster") == []
    assert raycluster_spec_problems(job["spec"]["rayClusterSpec"], "RayJob.rayClusterSpec") == []
    assert rayjob_problems(job) == []
    # the two clusters are the same but for the spec file the RayJob mounts on its head
    def without_spec_volume(spec):
        spec = copy.deepcopy(spec)
        pod = spec["headGroupSpec"]["template"]["spec"]
        pod.pop("volumes")
        pod["containers"][0].pop("volumeMounts")
        return spec
    assert without_spec_volume(job["spec"]["rayClusterSpec"]) == cluster["spec"]


def test_broken_kuberay_manifests_are_caught():
    cluster = load(KUBERAY / "raycluster.yaml")

    def broken(edit) -> list[str]:
        spec = copy.deepcopy(cluster["spec"])
        edit(spec)
        return raycluster_spec_problems(spec, "RayCluster")

    def worker(spec):
        return spec["workerGroupSpecs"][0]

    def gpu_limits(spec):
        return worker(spec)["template"]["spec"]["containers"][0]["resources"]["limits"]

    assert any("rayVersion" in p for p in broken(lambda s: s.update(rayVersion="2.9.3")))
    assert any("minReplicas <= replicas" in p for p in broken(lambda s: worker(s).update(replicas=9)))
    assert any("nvidia.com/gpu" in p for p in broken(lambda s: gpu_limits(s).pop("nvidia.com/gpu")))
    assert any("ClusterIP" in p for p in broken(lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer")))
    assert any("ClusterIP" in p for p in broken(lambda s: s["headGroupSpec"].update(
        headService={"spec": {"type": "NodePort"}})))
    assert any("token" in p for p in broken(lambda s: s.pop("authOptions")))
    assert any("mapping of strings" in p for p in broken(lambda s: s["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0})))
    assert any("does not name ray" in p for p in broken(lambda s: worker(s)["template"]["spec"]["containers"][0].update(
        image="rayproject/ray:2.9.3-py311-gpu")))

    job = load(KUBERAY / "rayjob.yaml")

    def broken_job(edit) -> list[str]:
        j = copy.deepcopy(job)
        edit(j["spec"])
        return rayjob_problems(j)

    assert any("shutdownAfterJobFinishes" in p for p in broken_job(lambda s: s.pop("shutdownAfterJobFinishes")))
    assert any("rayClusterSpec or clusterSelector" in p for p in broken_job(lambda s: s.pop("rayClusterSpec")))
    assert any("orchestrate launch" in p for p in broken_job(lambda s: s.update(entrypoint="python train.py")))
    assert any("refuses" in p for p in broken_job(lambda s: s.update(entrypoint=s["entrypoint"] + " --nodes 4")))
    assert any("--storage" in p for p in broken_job(lambda s: s.update(
        entrypoint=re.sub(r"--storage \S+", "", s["entrypoint"]))))
    assert any("no volume" in p for p in broken_job(lambda s: s.update(
        entrypoint=s["entrypoint"].replace("/home/ray/specs/", "/tmp/"))))


def test_the_kuberay_image_is_the_pinned_ray_with_this_package():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE).group(1)
    m = re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-(py3\d+)-gpu", base)
    assert m, f"{base} is not rayproject/ray:{RAY_VERSION}-py3XX-gpu"
    pins = re.findall(r"ray(?:\[[^\]]*\])?==([\w.]+)", dockerfile)
    assert pins == [RAY_VERSION]
    copied = {PurePosixPath(src).name for line in re.findall(r"^COPY\s+(.+)$", dockerfile, re.MULTILINE)
              for src in line.split()[:-1] if not src.startswith("--")}
    needed = set(PACKAGES) | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed <= copied, f"the image misses {needed - copied}"
    allowed = {line[1:].rstrip("/") for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert needed <= allowed, f"Dockerfile.dockerignore keeps {needed - allowed} out of the build context"
    # the manifests run the image this Dockerfile builds, tagged with its Ray and Python
    tags = {c["image"].rsplit(":", 1)[1] for path in KUBERAY.glob("*.yaml") for doc in load_all(path)
            for group in [doc["spec"].get("rayClusterSpec", doc["spec"])["headGroupSpec"],
                          *doc["spec"].get("rayClusterSpec", doc["spec"])["workerGroupSpecs"]]
            for c in pod_containers(group)}
    assert tags == {f"ray{RAY_VERSION}-{m.group(1)}-gpu"}
    assert f"-t distill-orchestrator:ray{RAY_VERSION}-{m.group(1)}-gpu" in dockerfile
    # the launchers run the same Ray image the Dockerfile builds on
    assert {load(p)["docker"]["image"] for p in LAUNCHERS} == {base}


# ---------------------------------------------------------------- the MLflow server

def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (and $$), with `env` as the environment."""
    def one(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"{name} is required: {arg}")
        return ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value).replace("$$", "$")


def required_vars(value: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+):\?[^}]*\}", value))


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def compose_problems(doc: dict, example_env: dict[str, str]) -> list[str]:
    problems = []
    services = doc.get("services", {})
    postgres, server = services.get("postgres"), services.get("mlflow")
    if not postgres or not str(postgres.get("image", "")).startswith("postgres:"):
        return ["no postgres service"]
    if not server:
        return ["no mlflow service"]
    env = {**example_env, "POSTGRES_PASSWORD": "from-the-environment"}
    # published ports: only the mlflow server, and only on 127.0.0.1 unless the user says otherwise
    if postgres.get("ports"):
        problems.append("postgres publishes a port; only the mlflow service should reach it")
    defaults = {k: v for k, v in env.items() if k != "MLFLOW_BIND"}   # MLFLOW_BIND at its default
    for port in server.get("ports", []):
        published = interpolate(str(port), defaults)
        host = published.rsplit(":", 2)[0] if published.count(":") >= 2 else "0.0.0.0"
        if host not in ("127.0.0.1", "localhost"):
            problems.append(f"mlflow is published on {host} ({port}), not 127.0.0.1")
    if not server.get("ports"):
        problems.append("mlflow publishes no port")
    # the server: PostgreSQL backend without a password in the URI, proxied object-store artifacts
    command = [str(a) for a in server.get("command", [])]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else "" for a in command}
    backend = interpolate(args.get("--backend-store-uri", ""), env)
    if not backend.startswith("postgresql") or urlsplit(backend).hostname != "postgres":
        problems.append(f"backend store {backend!r} is not the postgres service")
    if urlsplit(backend).password:
        problems.append("the backend store URI holds a password (libpq reads PGPASSWORD)")
    if "--serve-artifacts" not in args:
        problems.append("the server does not proxy artifacts (--serve-artifacts)")
    dest = args.get("--artifacts-destination", "")
    if not required_vars(dest):
        problems.append(f"--artifacts-destination {dest!r} is not a required variable (a missing one would "
                        f"silently fall back to a local folder)")
    else:
        uri = interpolate(dest, env)
        if urlsplit(uri).scheme not in ("s3", "gs", "wasbs", "abfss"):
            problems.append(f"--artifacts-destination in .env.example is {uri!r}, not an object store")
    # secrets: every secret-looking variable comes from the environment, never a literal or a default
    for name, svc in services.items():
        envs = svc.get("environment", {})
        envs = dict(e.split("=", 1) if "=" in e else (e, None) for e in envs) if isinstance(envs, list) else envs
        for key, value in envs.items():
            if SECRET_KEY.search(key) and value is not None and not re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)):
                problems.append(f"{name}.environment.{key} is {value!r}: a literal or a default, not ${{VAR}}")
    if re.search(r"://[^/\s:@]+:[^/\s@]+@", interpolate(json.dumps(doc), env)):
        problems.append("a URI with a password in it")
    for key, value in example_env.items():
        if SECRET_KEY.search(key) and value:
            problems.append(f".env.example gives {key} a value")
    return problems


def test_the_mlflow_compose_recipe_keeps_credentials_out_and_stays_on_loopback():
    doc = load(MLFLOW_DIR / "docker-compose.yaml")
    example = env_file(MLFLOW_DIR / ".env.example")
    assert compose_problems(doc, example) == []
    assert ".env" in (MLFLOW_DIR / ".gitignore").read_text().split()
    assert doc["services"]["mlflow"]["env_file"] == ".env"
    # the image: MLflow's own, at the client's version, with the PostgreSQL driver and S3/GCS clients
    dockerfile = (MLFLOW_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM\s+ghcr\.io/mlflow/mlflow:v(\S+)", dockerfile, re.MULTILINE).group(1) == mlflow.__version__
    for package in ("psycopg2", "boto3", "google-cloud-storage"):
        assert package in dockerfile
    assert doc["services"]["mlflow"]["image"].endswith(f":{mlflow.__version__}")


def test_a_leaky_compose_recipe_is_caught():
    doc = load(MLFLOW_DIR / "docker-compose.yaml")
    example = env_file(MLFLOW_DIR / ".env.example")

    def broken(edit, env=example) -> list[str]:
        d = copy.deepcopy(doc)
        edit(d["services"])
        return compose_problems(d, env)

    def set_arg(flag_name, value):
        def edit(s):
            s["mlflow"]["command"] = [a for a in s["mlflow"]["command"] if not a.startswith(flag_name)] + \
                                     [f"{flag_name}={value}"]
        return edit

    assert any("not 127.0.0.1" in p for p in broken(lambda s: s["mlflow"].update(ports=["5000:5000"])))
    assert any("not 127.0.0.1" in p for p in broken(lambda s: s["mlflow"].update(ports=["0.0.0.0:5000:5000"])))
    assert any("postgres publishes" in p for p in broken(lambda s: s["postgres"].update(ports=["5432:5432"])))
    assert any("literal" in p for p in broken(lambda s: s["postgres"]["environment"].update(
        POSTGRES_PASSWORD="hunter2")))
    assert any("literal" in p for p in broken(lambda s: s["postgres"]["environment"].update(
        POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-hunter2}")))
    assert any("password" in p for p in broken(set_arg("--backend-store-uri",
                                                        "postgresql+psycopg2://mlflow:hunter2@postgres/mlflow")))
    assert any("not the postgres" in p for p in broken(set_arg("--backend-store-uri", "sqlite:///mlflow.db")))
    assert any("required variable" in p for p in broken(set_arg("--artifacts-destination", "./mlartifacts")))
    assert any("not an object store" in p for p in broken(
        lambda s: None, {**example, "MLFLOW_ARTIFACTS_DESTINATION": "/srv/mlflow-artifacts"}))
    assert any(".env.example" in p for p in broken(lambda s: None, {**example, "AWS_SECRET_ACCESS_KEY": "abc"}))


def test_the_mlflow_kubernetes_variant_takes_secrets_from_a_secret():
    docs = load_all(MLFLOW_DIR / "kubernetes.yaml")
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    assert set(by_kind) == {"Service", "StatefulSet", "Deployment", "NetworkPolicy"}
    assert set(by_kind["NetworkPolicy"]) == {"mlflow", "postgres"}
    server = by_kind["Deployment"]["mlflow"]["spec"]["template"]["spec"]["containers"][0]
    db = by_kind["StatefulSet"]["postgres"]["spec"]["template"]["spec"]["containers"][0]
    assert server["image"].endswith(f":{mlflow.__version__}")
    for container in (server, db):
        for e in container.get("env", []):
            if SECRET_KEY.search(e["name"]):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    secret_env = {e["name"] for e in server["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"PGPASSWORD", "MLFLOW_ARTIFACTS_DESTINATION"} <= secret_env
    args = dict(a.split("=", 1) for a in server["command"] if a.startswith("--") and "=" in a)
    backend = urlsplit(args["--backend-store-uri"])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres" and not backend.password
    assert args["--artifacts-destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert "--serve-artifacts" in server["command"]
    allowed = next(e["value"] for e in server["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    assert "mlflow:5000" in allowed and "*" not in allowed     # the in-namespace URI, no wildcard host


# ---------------------------------------------------------------- across cluster/

def all_cluster_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(CLUSTER.rglob("*.yaml")) for d in load_all(p)]


def exposure_problems(docs) -> list[str]:
    problems = []
    for path, doc in docs:
        kind, service_type = doc.get("kind"), doc.get("spec", {}).get("type", "ClusterIP")
        if kind == "Service" and service_type in ("LoadBalancer", "NodePort"):
            ports = [p.get("port") for p in doc["spec"].get("ports", [])]
            problems.append(f"{path.name}: Service {doc['metadata']['name']} of type {doc['spec']['type']} ({ports})")
        if doc.get("kind") in ("Ingress", "Gateway", "HTTPRoute"):
            problems.append(f"{path.name}: {doc['kind']} {doc['metadata']['name']}")
        text = json.dumps(doc)   # one line per string, whatever its length
        if re.search(r'"hostPort":|"hostNetwork": true|--dashboard-host[= ]+0\.0\.0\.0', text):
            problems.append(f"{path.name}: a host port, the host network or a dashboard on 0.0.0.0")
    return problems


def test_nothing_in_cluster_is_exposed_beyond_the_cluster():
    docs = all_cluster_docs()
    assert len(docs) >= 10
    assert exposure_problems(docs) == []
    lb = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ray-dashboard"},
          "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}, {"port": 10001}]}}
    assert exposure_problems([(Path("x.yaml"), lb)]) == [
        "x.yaml: Service ray-dashboard of type LoadBalancer ([8265, 10001])"]
    aws = load(CLUSTER / "aws.yaml")
    aws["head_start_ray_commands"][-1] = aws["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")
    pod = {"kind": "Pod", "spec": {"containers": [{"name": "ray-head", "ports": [{"containerPort": 8265,
                                                                                  "hostPort": 8265}]}]}}
    assert len(exposure_problems([(Path("aws.yaml"), aws), (Path("pod.yaml"), pod)])) == 2


def test_every_placeholder_is_explained_in_the_readme():
    readme = (CLUSTER / "README.md").read_text()
    placeholders = {m for p in CLUSTER.rglob("*") if p.is_file() and p.name != "README.md"
                    for m in re.findall(r"\bYOUR_[A-Z_]+\b", p.read_text())}
    missing = {m for m in placeholders if m not in readme}
    assert not missing, f"cluster/README.md does not say what to put in place of {sorted(missing)}"


def readme_commands(text: str) -> list[list[str]]:
    """The `orchestrate ...` commands in the README's shell blocks (continuation lines joined)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("orchestrate "):
                commands.append(shlex.split(line, comments=True))
    return commands


def test_the_readmes_orchestrate_commands_are_accepted_by_the_cli():
    from orchestrator.cli import main

    commands = readme_commands((CLUSTER / "README.md").read_text())
    used = {c[1] for c in commands}
    assert {"submit", "status", "logs", "results", "export"} <= used
    for args in commands:
        cmd = main.commands[args[1]]
        ctx = cmd.make_context(args[1], args[2:])       # raises click.UsageError on an unknown option
        if args[1] == "submit":
            assert ctx.params["storage"] and ctx.params["root"].startswith("/") and ctx.params["address"]
    with pytest.raises(Exception, match="--nodes"):
        main.commands["submit"].make_context("submit", ["spec.yaml", "--nodes", "4"])
