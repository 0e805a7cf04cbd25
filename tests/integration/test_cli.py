"""The command line: version, --help, check-config (good examples, bad files beside the exact
errors they must produce), run refusing a bad file, migrate applying once."""

import glob
import os
import re
import subprocess

import pytest

import servers

HERE = os.path.dirname(os.path.abspath(__file__))
BAD_DIR = os.path.join(HERE, "data", "bad")
BAD = sorted(glob.glob(os.path.join(BAD_DIR, "*.yaml")))
EXAMPLES = sorted(glob.glob(os.path.join(servers.ROOT, "examples", "*.yaml")))

# What the examples read from the environment (docker-compose and scripts/dev-up set them).
EXAMPLE_ENV = {
    "ESMD_ADMIN_TOKEN": "test-token",
    "ESMD_POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/esmd",
    "ESMD_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "ESMD_FUNCTION_URL": "http://127.0.0.1:8080/2015-03-31/functions/function/invocations",
    "ESMD_ADMIN_LISTEN": "127.0.0.1:9000",
}


def esmd(*args, cwd=None, env=None, timeout=60):
    e = {k: v for k, v in os.environ.items() if not k.startswith("ESMD_TEST_UNSET")}
    e.update(env or {})
    return subprocess.run([servers.binary("esmd")] + list(args), cwd=cwd, env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          text=True)


def test_version():
    r = esmd("version")
    assert r.returncode == 0, r.stderr
    assert re.match(r"^esmd \d+\.\d+\.\d+", r.stdout), r.stdout


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["check-config", "--help"],
                                  ["migrate", "--help"], ["version", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help(args):
    r = esmd(*args)
    assert r.returncode == 0, r.stderr
    assert "usage: esmd" in r.stdout


def test_usage_errors_exit_2():
    assert esmd("no-such-command").returncode == 2
    assert esmd("run").returncode == 2  # -c FILE is required


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_are_valid(path):
    r = esmd("check-config", path, env=EXAMPLE_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "%s: ok\n" % path


def test_there_are_bad_examples():
    assert len(BAD) >= 6


@pytest.mark.parametrize("path", BAD, ids=os.path.basename)
def test_check_config_reports_every_error(path):
    """Each data/bad/NAME.yaml must produce exactly data/bad/NAME.expected on stderr
    (ESMD_UPDATE_EXPECTED=1 rewrites the .expected files from the binary: review the diff)."""
    name = os.path.basename(path)
    expected_path = path[:-len(".yaml")] + ".expected"
    r = esmd("check-config", name, cwd=BAD_DIR)
    if os.environ.get("ESMD_UPDATE_EXPECTED"):
        with open(expected_path, "w") as f:
            f.write(r.stderr)
    assert os.path.exists(expected_path), "no %s; esmd printed:\n%s" % (expected_path, r.stderr)
    with open(expected_path) as f:
        expected = f.read()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr == expected
    for line in expected.splitlines():
        assert re.match(r"^%s:\d+:\d+: " % re.escape(name), line), line


def test_run_refuses_a_bad_config():
    r = esmd("run", "-c", "several.yaml", cwd=BAD_DIR, timeout=30)
    assert r.returncode == 1
    with open(os.path.join(BAD_DIR, "several.expected")) as f:
        for line in f.read().splitlines():
            assert line in r.stderr


def test_migrate_applies_once(postgres, tmp_path):
    db = "migrate_%d" % os.getpid()
    url = postgres.create_db(db)
    known = len(glob.glob(os.path.join(servers.ROOT, "migrations", "*.sql")))
    cfg = tmp_path / "esmd.yaml"
    cfg.write_text("""\
postgres: %s
connections:
  k: { type: kafka, bootstrap_servers: "127.0.0.1:9" }
functions:
  fn: { url: "http://127.0.0.1:9/2015-03-31/functions/function/invocations" }
mappings:
  - { name: m1, function: fn, source: { kafka: k, topics: [orders] } }
""" % url)
    r = esmd("migrate", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "applied %d migration" % known in r.stdout
    rows = postgres.sql("SELECT * FROM esmd.schema_migrations ORDER BY 1", db=db)
    assert len(rows) == known

    r = esmd("migrate", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "applied 0 migrations" in r.stdout
    assert postgres.sql("SELECT * FROM esmd.schema_migrations ORDER BY 1", db=db) == rows
