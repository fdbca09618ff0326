"""Test-wide settings: CPU only, quiet Prefect state in a temp dir, artifacts under a temp LMPIPE_ROOT.

`pytest` runs the unit tier; the marked tiers (pyproject.toml: flow, cluster, s3, browser, multiprocess, fault, gpu)
run with `-m`, every tier with `pytest -m "not fault" && pytest -m fault` (docs/testing.md).
"""

import logging
import os
import re
import tempfile

import pytest

_tmp = tempfile.mkdtemp(prefix="lmpipe-tests-")
os.environ["LMPIPE_ROOT"] = os.path.join(_tmp, "artifacts")  # never the user's real artifacts
os.environ.update({
    "PREFECT_HOME": os.path.join(_tmp, "prefect-home"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_tmp, "prefect-results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
})
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on localhost (moto in server mode) with one bucket; yields its endpoint URL. The AWS_*
    variables point s3fs (and any subprocess) at it."""
    from stages.training.distributed import free_port

    server_module = pytest.importorskip("moto.server", reason="needs moto[server] (in the test extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (in the test and cloud extras)")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in S3_ENV}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("lmpipe-test")
    yield endpoint
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_root(s3_server, tmp_path, monkeypatch):
    """LMPIPE_ROOT at a fresh prefix of the test bucket, its local mirror in tmp_path/mirror; yields the URL."""
    import uuid

    url = f"s3://lmpipe-test/{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("LMPIPE_ROOT", url)
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "mirror"))
    yield url


def pytest_configure(config):
    """CPU only (the GPU hidden before torch looks for it), except where the gpu tier is asked for (`-m gpu`) or
    LMPIPE_TEST_CUDA names the devices to use."""
    wants_gpu = re.search(r"(?<!not )\bgpu\b", config.option.markexpr or "")
    if "LMPIPE_TEST_CUDA" in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["LMPIPE_TEST_CUDA"]
    elif not wants_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    """A test that uses the local S3 server is in the `s3` tier, whichever file it lives in."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
