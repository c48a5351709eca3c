import subprocess

import pytest

from conftest import PAGE, require

pytestmark = pytest.mark.integration


def test_curl_socks5h_through_default(socks_server, http_server):
    server = socks_server()
    curl = require("curl")
    out = subprocess.run([curl, "-sS", "--max-time", "10", "-x",
                          f"socks5h://127.0.0.1:{server.port}",
                          f"http://localhost:{http_server}/"], capture_output=True, check=True)
    assert out.stdout == PAGE
    server.wait_for_log(r"connect localhost:\d+ up=\d+ down=\d+ .* ok")
