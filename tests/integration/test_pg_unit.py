"""Runs the C unit test that needs a live PostgreSQL (build/test_pg) against the fixture's
server: ctest runs it without ESMD_TEST_PG, where it skips its live part."""

import os
import subprocess

import pytest

import servers


def test_unit_test_pg_against_live_postgres(postgres):
    if not os.path.exists(os.path.join(servers.ROOT, "tests", "unit", "test_pg.c")):
        pytest.skip("there is no tests/unit/test_pg.c")
    exe = servers.binary("test_pg")
    assert os.path.exists(exe), "%s not built" % exe
    url = postgres.create_db("unit_pg_%d" % os.getpid())
    r = subprocess.run([exe], cwd=servers.ROOT, env=dict(os.environ, ESMD_TEST_PG=url),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:]
