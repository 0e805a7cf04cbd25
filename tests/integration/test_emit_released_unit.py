"""Runs the C unit test that needs a live Redis and PostgreSQL (build/test_emit_released: a host
whose emit releases the record at once, as the core does for a mapping that is stopping) against
the fixtures' servers: ctest runs it without ESMD_TEST_REDIS / ESMD_TEST_PG, where it skips.
Under the asan step it catches a connector that writes to a record after host->emit."""

import os
import subprocess

import servers


def test_unit_test_emit_released_against_live_servers(redis, postgres):
    exe = servers.binary("test_emit_released")
    assert os.path.exists(exe), "%s not built" % exe
    url = postgres.create_db("unit_emit_%d" % os.getpid())
    r = subprocess.run([exe], cwd=servers.ROOT,
                       env=dict(os.environ, ESMD_TEST_REDIS=redis.url, ESMD_TEST_PG=url),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-6000:]
    assert "4 test(s) run" in r.stdout and "PASSED  ] 4 test(s)" in r.stdout, r.stdout[-3000:]
