"""Private sessions stay private: a pipeline's own Ray takes none of the ports or directories of a head started
later with cluster/local_head.sh, and a job submitted to that head runs there; the script names the process
holding a port it needs, in one line."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nncift.exec.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local_head.sh"
RAY_DEFAULT_PORTS = {"GCS_PORT": 6379, "DASHBOARD_PORT": 8265, "AGENT_PORT": 52365, "CLIENT_PORT": 10001}


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _head_env(temp_dir: str, **ports: int) -> dict[str, str]:
    env = {**os.environ, "VENV": sys.prefix, "HEAD_TEMP_DIR": temp_dir, "NUM_CPUS": "1", "GRACE_S": "5"}
    env.update({k: str(v) for k, v in ports.items()})
    env.pop("RAY_ADDRESS", None)
    return env


def test_local_head_names_the_process_holding_a_port_in_one_line_and_starts_nothing():
    temp_dir = tempfile.mkdtemp(prefix="nncift-head-", dir="/tmp")
    try:
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            others = {k: free_port() for k in ("GCS_PORT", "AGENT_PORT", "CLIENT_PORT")}
            env = _head_env(temp_dir, DASHBOARD_PORT=port, **others)
            res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith(f"error: port {port} (DASHBOARD_PORT) is already held by pid {os.getpid()} ")
        assert lines[0].endswith("set DASHBOARD_PORT=<a free port>")
        assert "Traceback" not in res.stdout + res.stderr and "Ray head is up" not in res.stdout
        assert not Path(temp_dir, "local_head.pgid").exists()  # nothing was started
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


PRIVATE = """
import json, os, sys
import psutil, ray
from nncift.config import RayConfig
from nncift.exec.ray_executor import init_ray, private_temp_dir

init_ray(RayConfig(num_cpus=2))
node = ray._private.worker.global_worker.node
pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
ports = sorted({c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids})
print(json.dumps({"dashboard": node.webui_url, "temp": str(private_temp_dir()), "ports": ports}), flush=True)
sys.stdin.readline()  # keep the session up until the test is done
"""


@pytest.mark.slow  # a private Ray, a head and a job: about a minute
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_head_started_during_a_pipeline_run_works_and_a_submitted_job_lands_on_it():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    private = subprocess.Popen([sys.executable, "-c", PRIVATE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env, cwd=REPO)  # fmt: skip
    head_dir = tempfile.mkdtemp(prefix="nncift-head-", dir="/tmp")  # short: Ray's socket paths live under it
    head_env = None
    try:
        info = json.loads(private.stdout.readline())
        # the pipeline's Ray holds none of Ray's default head ports, and keeps out of /tmp/ray
        assert not set(info["ports"]) & set(RAY_DEFAULT_PORTS.values()), info
        assert info["temp"].startswith("/tmp/nncift-ray-") and Path(info["temp"]).is_dir()
        # Ray's default ports for the head (the reported case), unless something else on this machine holds one
        ports = {k: p if _is_free(p) else free_port() for k, p in RAY_DEFAULT_PORTS.items()}
        ports["AGENT_PORT"] = free_port()  # the script's default (52366) may be another head's
        head_env = _head_env(head_dir, **ports)
        res = subprocess.run(["bash", str(SCRIPT)], env=head_env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        job = "import ray; ray.init(); print('ran on GCS', ray.get_runtime_context().gcs_address)"
        ray_cli = str(Path(sys.prefix, "bin", "ray"))
        head_url = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"
        res = subprocess.run([ray_cli, "job", "submit", "--address", head_url, "--", sys.executable, "-c", job],
                             env=head_env, capture_output=True, text=True, timeout=120)  # fmt: skip
        out = res.stdout + res.stderr
        assert res.returncode == 0 and "succeeded" in out, out
        ran_on = re.search(r"ran on GCS (\S+)", out)
        assert ran_on and ran_on.group(1).endswith(f":{ports['GCS_PORT']}"), out  # the head's GCS
        from ray.job_submission import JobSubmissionClient

        submitted = [j for j in JobSubmissionClient(f"http://{info['dashboard']}").list_jobs() if j.submission_id]
        assert submitted == []  # the private session never saw the job
    finally:
        if head_env is not None:
            subprocess.run(["bash", str(SCRIPT), "stop"], env=head_env, capture_output=True, timeout=60)
        shutil.rmtree(head_dir, ignore_errors=True)
        private.stdin.write("\n")
        private.stdin.close()
        private.wait(timeout=60)
    assert not Path(info["temp"]).exists()  # removed at exit
