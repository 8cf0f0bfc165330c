"""The anchor: LiteLLM's proxy in front of the same fake upstream (`--vs-litellm`).

It is installed once, with `pip install 'litellm[proxy]'`, into a virtualenv of its own in the
user's cache (`~/.cache/chat-bench/litellm-venv`, outside the checkout so that neither git nor mypy
sees it), so that none of its many dependencies reach the service's venv.
It runs with one worker, no database, logging at error, and the cost map read from the package
(`LITELLM_LOCAL_MODEL_COST_MAP=True`: no fetch at start-up); the one model it knows is the fake's
OpenAI model, with the same key and base URL the service uses. Clients authenticate with a master
key (without one it refuses to start); there is no database, so the key is checked in memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import psutil

from bench.processes import API_KEY, MODELS, Children, Upstream, clean_env, free_port, wait_ready

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
VENV = CACHE / "chat-bench" / "litellm-venv"
EXECUTABLE = VENV / "bin" / "litellm"
MASTER_KEY = "sk-" + "5e" * 32  # it refuses to start without one; a client sends it as its key


def ensure_installed() -> Path:
    """The `litellm` command of the anchor's own venv, installing it the first time (a few minutes)."""
    if not EXECUTABLE.exists():
        print(f"installing litellm[proxy] into {VENV} ...", file=sys.stderr, flush=True)
        venv.create(VENV, with_pip=True, clear=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return EXECUTABLE


def version() -> str:
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


def config(upstream: Upstream) -> dict[str, object]:
    model = MODELS["openai"]
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream.url + "/v1",
                    "api_key": API_KEY,
                },
            }
        ],
        "litellm_settings": {"set_verbose": False, "telemetry": False, "drop_params": True},
        "general_settings": {"disable_spend_logs": True, "master_key": MASTER_KEY},
    }


async def start(children: Children, upstream: Upstream, run_dir: Path) -> tuple[psutil.Popen, str]:
    """Start the proxy; returns it and its base URL (…/v1), once it answers its liveness check."""
    path = run_dir / "litellm.yaml"
    path.write_text(json.dumps(config(upstream), indent=2))  # JSON is YAML
    port = free_port()
    log = run_dir / "litellm.log"
    env = clean_env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    args = [str(ensure_installed()), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    proc = children.spawn(
        [*args, "--num_workers", "1"],
        cwd=run_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    await wait_ready(proc, url + "/health/liveliness", log, started, timeout=180)
    return proc, url + "/v1"
