"""A schemathesis run over /openapi.json against a real ``use-search serve`` (every bad value is a 422; the document describes every answer).

Bounded examples per operation, all phases (coverage edge cases, fuzzing, stateful via the document's
links) and every built-in check but the two exceptions in tests/schemathesis.toml: no 5xx, and every
response matches the document (status code, media type, body schema, headers).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import skimage.data
from PIL import Image

from servers import api_server

KEY = "schemathesis-key-0123456789"
EXAMPLES = int(os.environ.get("USE_SEARCH_ST_EXAMPLES", "25"))  # per operation and phase
SEED = os.environ.get("USE_SEARCH_ST_SEED", "20261125")
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.mark.slow
def test_schemathesis_run(tmp_path):
    env = {"USE_SEARCH_API_KEY": KEY, "USE_SEARCH_MAX_UPLOAD_BYTES": str(1 << 20),
           "USE_SEARCH_API__WORKER_TIMEOUT_S": "120"}
    with api_server(tmp_path, **env) as base:
        img = Image.fromarray(skimage.data.coffee())
        img.thumbnail((64, 64))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        r = httpx.post(base + "/images", files={"file": ("coffee.png", buf.getvalue(), "image/png")},
                       headers={"X-API-Key": KEY}, timeout=300)
        assert r.status_code == 201, r.text  # something to find, so search returns hits to follow links from
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(CONFIG), "run",
             f"{base}/openapi.json", "-H", f"X-API-Key: {KEY}", "--max-examples", str(EXAMPLES), "--seed", SEED,
             "--workers", "1", "--request-timeout", "300"],
            capture_output=True, text=True, timeout=1200, cwd=tmp_path,  # its .schemathesis/ cache goes there
        )
    out = run.stdout + run.stderr
    summary = re.search(r"Test cases:\s*\n\s*(.+)", out)
    print(f"schemathesis: {summary.group(1) if summary else '?'} (seed {SEED}, {EXAMPLES} examples)")
    assert run.returncode == 0, out[-6000:]
    assert summary and "generated" in summary.group(1) and "fail" not in summary.group(1)
