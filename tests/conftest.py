"""Test-wide settings: CPU only, quiet Prefect state in a temp dir, artifacts under a temp LMPIPE_ROOT.

Run everything with `pytest` (the default excludes `-m slow`); the Prefect end-to-end tests are marked `flow`.
"""

import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="lmpipe-tests-")
os.environ["LMPIPE_ROOT"] = os.path.join(_tmp, "artifacts")  # never the user's real artifacts
os.environ.update({
    "PREFECT_HOME": os.path.join(_tmp, "prefect-home"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_tmp, "prefect-results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "CUDA_VISIBLE_DEVICES": os.environ.get("LMPIPE_TEST_CUDA", ""),
})
os.environ.pop("PREFECT_API_URL", None)
