"""The `study worker` templates of deploy/: the Kubernetes YAML loads, and the command in each template is a
valid `python -m study worker` invocation once its environment variables are filled in."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from conftest import LENET, ROOT, make_spec, postgres_database, run_main
from study.cli import build_parser, cmd_worker

DEPLOY = ROOT / "deploy"
ENVIRONMENT = {"STUDY": "vgg_ratio", "STUDY_STORAGE": "postgresql://study:secret@db-host:5432/studies", "STUDY_CHECKPOINTS": "/shared/checkpoints"}


def _worker_args(words: list[str]):
    """The parsed arguments of `python -m study worker ...`, after the command's own prefix."""
    assert words[:3] == ["python", "-m", "study"], words
    args = build_parser().parse_args(words[3:])
    assert args.command == "worker" and args.run is cmd_worker
    return args


def test_slurm_array_runs_one_worker_per_task():
    script = (DEPLOY / "slurm" / "study-worker.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=\d+-\d+$", script, re.MULTILINE)
    # CPUs only, so it runs on any partition; the GPU is sbatch's option, documented beside it.
    assert "#SBATCH --gres" not in script and "--gres=gpu:1" in script and "--gres=gpu:1" in (DEPLOY / "slurm" / "README.md").read_text()
    [line] = [line for line in script.splitlines() if line.startswith("srun ")]
    words = shlex.split(re.sub(r'"?\$\{?(\w+)\}?"?', lambda m: shlex.quote(ENVIRONMENT[m.group(1)]), line.removesuffix(" &")))[1:]
    args = _worker_args(words)
    assert args.name == "vgg_ratio" and args.storage == ENVIRONMENT["STUDY_STORAGE"]
    assert str(args.checkpoint_dir) == ENVIRONMENT["STUDY_CHECKPOINTS"]  # a worker on PostgreSQL is refused without one
    assert "MLFLOW_TRACKING_URI" in script  # the worker mirrors into an MLflow server
    # Preempted or near its time limit, the job goes back to the queue and its trial resumes (tests/test_slurm.py).
    assert "#SBATCH --requeue" in script and re.search(r"^#SBATCH --signal=B:USR1@\d+$", script, re.MULTILINE)
    assert """trap 'scontrol requeue "$SLURM_JOB_ID"' USR1""" in script


def test_kubernetes_indexed_job_runs_workers_on_postgresql_and_an_mlflow_server():
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "study-worker.yaml").read_text()))
    secret, job = documents
    assert secret["kind"] == "Secret" and secret["stringData"]["url"].startswith("postgresql://")
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["STUDY_STORAGE"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    # Kubernetes expands $(NAME) in a container's command from its environment.
    words = [re.sub(r"\$\((\w+)\)", lambda m: ENVIRONMENT[m.group(1)], word) for word in container["command"]]
    args = _worker_args(words)
    assert args.storage == ENVIRONMENT["STUDY_STORAGE"] and args.name == "vgg_ratio"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in job["spec"]["template"]["spec"]["volumes"]}
    assert str(args.checkpoint_dir) == mounts["checkpoints"] and "persistentVolumeClaim" in volumes["checkpoints"]
    # CPUs only, so it schedules on any node; a pod works in its emptyDir, with STUDY_HOME there.
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert volumes["scratch"]["emptyDir"] == {} and mounts["scratch"] == container["workingDir"]
    assert env["STUDY_HOME"]["value"].startswith(container["workingDir"] + "/")
    # An evicted pod is replaced without spending the backoff limit, and its trial resumes from the shared volume.
    [rule] = job["spec"]["podFailurePolicy"]["rules"]
    assert rule == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_kubernetes_job_with_its_gpu_line_uncommented_asks_one_gpu_a_worker():
    import kubernetes_validate

    text = (DEPLOY / "kubernetes" / "study-worker.yaml").read_text()
    [line] = [line for line in text.splitlines() if "# nvidia.com/gpu: 1" in line]
    job = list(yaml.safe_load_all(text.replace(line, line.replace("# nvidia.com/gpu", "nvidia.com/gpu"))))[1]
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu: 1" in (DEPLOY / "kubernetes" / "README.md").read_text()


def test_kubernetes_manifests_pass_the_kubernetes_schemas():
    """Strict validation (an unknown or misspelt field fails) against the schemas kubernetes-validate ships, offline;
    and every $(NAME) a container expands is one of its environment variables (Kubernetes leaves any other verbatim)."""
    import kubernetes_validate

    manifests = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert manifests
    for manifest in manifests:
        for document in yaml.safe_load_all(manifest.read_text()):
            kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
            for container in document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                defined = {item["name"] for item in container.get("env", [])}
                expanded = set(re.findall(r"\$\((\w+)\)", " ".join(container.get("command", []) + container.get("args", []))))
                assert expanded <= defined, (manifest.name, expanded - defined)


def test_kubernetes_job_reads_the_data_where_debian_installs_it():
    """FASHION_MNIST_DIR names the directory of Debian's dataset-fashion-mnist, which the README's image installs;
    where the package is installed here, the data there passes the trainer's own check."""
    from objectives.data import DEBIAN_DIR, verify

    job = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "study-worker.yaml").read_text()))[1]
    [container] = job["spec"]["template"]["spec"]["containers"]
    directory = {item["name"]: item.get("value") for item in container["env"]}["FASHION_MNIST_DIR"]
    assert directory == str(DEBIAN_DIR)
    assert f"`{DEBIAN_DIR}`" in (DEPLOY / "kubernetes" / "README.md").read_text()
    if not DEBIAN_DIR.is_dir():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed here ({DEBIAN_DIR} does not exist)")
    verify(directory)


@pytest.mark.slow
def test_a_worker_on_remote_storage_and_tracking_writes_nothing_where_it_runs(tmp_path, monkeypatch):
    """As the templates run it: PostgreSQL, an `mlflow server`, STUDY_HOME unset; its working directory stays empty."""
    from reliability.checks import MlflowServer

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        with postgres_database("deploy") as url:
            spec = make_spec(tmp_path, "remote", LENET)
            remote = {"STUDY_HOME": str(tmp_path / "login"), "MLFLOW_TRACKING_URI": server.url}
            result = run_main("create", str(spec), "--trials", "1", "--preset", "cpu", "--storage", url, env=remote)
            assert result.returncode == 0, result.stderr
            empty = tmp_path / "node"
            empty.mkdir()
            monkeypatch.chdir(empty)
            shared = tmp_path / "shared-checkpoints"  # a folder every node mounts, outside the working directory
            result = run_main("worker", "remote", "--storage", url, "--checkpoint-dir", str(shared), env={**remote, "STUDY_HOME": None})
            assert result.returncode == 0, result.stderr
            assert "1 of 1 trials" in result.stdout
            assert list(empty.iterdir()) == []
    finally:
        server.stop()
