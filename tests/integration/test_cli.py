"""The command line: version, --help, check-config (good examples, bad files beside the exact
errors they must produce), run refusing a bad file, migrate applying once, match (filter
patterns tried on events from stdin)."""

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
                                  ["migrate", "--help"], ["match", "--help"],
                                  ["version", "--help"]],
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


def test_run_and_check_config_refuse_the_same_destinations():
    """Destination URIs (and the Redis URLs of the connections redis:// destinations name) go
    through the parsers the running service uses: run refuses destinations.yaml with exactly the
    lines check-config prints."""
    with open(os.path.join(BAD_DIR, "destinations.expected")) as f:
        expected = f.read().splitlines()
    assert any("99999999" in line for line in expected)
    assert any("rediss://" in line for line in expected)
    r = esmd("run", "-c", "destinations.yaml", cwd=BAD_DIR, timeout=30)
    assert r.returncode == 1
    for line in expected:
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


# ---- esmd match ----

ORDER_PAID = '{"source":"app.orders","detail":{"status":"PAID","amount":120.5,"tags":["vip"]}}'
ORDER_SHIPPED = '{"source":"app.orders","detail":{"status":"SHIPPED","amount":12,"tags":[]}}'
REFUND = '{"source":"app.billing","detail":{"status":"REFUNDED","amount":-3}}'


def match(*args, stdin="", timeout=30):
    return subprocess.run([servers.binary("esmd"), "match"] + list(args), input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          text=True)


def test_match_one_pattern():
    events = "\n".join([ORDER_PAID, ORDER_SHIPPED, REFUND]) + "\n"
    r = match("--pattern", '{"detail":{"status":["PAID"]}}', stdin=events)
    assert (r.returncode, r.stdout, r.stderr) == (0, "true\nfalse\nfalse\n", "")
    r = match("-p", '{"source":[{"prefix":"app."}],"detail":{"amount":[{"numeric":[">",100]}]}}',
              stdin=events)
    assert (r.returncode, r.stdout, r.stderr) == (0, "true\nfalse\nfalse\n", "")


def test_match_no_pattern_matches():
    r = match("-p", '{"source":["app.crm"]}', stdin=ORDER_PAID + "\n" + REFUND + "\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "false\nfalse\n", "")


def test_match_several_patterns_are_ored(tmp_path):
    pf = tmp_path / "refunds.json"
    pf.write_text('{\n  "detail": {\n    "status": ["REFUNDED"]\n  }\n}\n')
    events = "\n".join([ORDER_PAID, ORDER_SHIPPED, REFUND]) + "\n"
    r = match("-p", '{"detail":{"tags":["vip"]}}', "--pattern-file", str(pf), stdin=events)
    assert (r.returncode, r.stdout, r.stderr) == (0, "true\nfalse\ntrue\n", "")
    r = match("-f", str(pf), stdin=events)
    assert r.stdout == "false\nfalse\ntrue\n"


def test_match_last_line_without_newline_and_crlf():
    r = match("-p", '{"detail":{"status":["PAID"]}}', stdin=ORDER_PAID + "\r\n" + ORDER_PAID)
    assert (r.returncode, r.stdout, r.stderr) == (0, "true\ntrue\n", "")
    r = match("-p", '{"detail":{"status":["PAID"]}}', stdin="")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_match_invalid_pattern_exits_2(tmp_path):
    r = match("-p", '{"detail":{"status":["PAID"]}}',
              "-p", '{"detail":{"status":[{"prefx":"P"}]}}', stdin=ORDER_PAID + "\n")
    assert r.returncode == 2
    assert r.stdout == ""  # no event is read
    assert re.match(r"^pattern 2:1:\d+: \S.*\n$", r.stderr), r.stderr
    # Positions are in the pattern's text: line 3 of the file.
    pf = tmp_path / "bad.json"
    pf.write_text('{\n  "detail": {\n    "amount": [{"numeric": [">", "ten"]}]\n  }\n}\n')
    r = match("-f", str(pf), stdin=ORDER_PAID + "\n")
    assert r.returncode == 2
    assert re.match(r"^pattern 1:3:\d+: \S.*\n$", r.stderr), r.stderr
    # Not JSON at all, and not an object.
    for bad in ['{"detail":', '["PAID"]', "", "{} x"]:
        r = match("-p", bad, stdin=ORDER_PAID + "\n")
        assert r.returncode == 2, bad
        assert re.match(r"^pattern 1:\d+:\d+: \S", r.stderr), (bad, r.stderr)


def test_match_usage_errors_exit_2(tmp_path):
    r = match(stdin=ORDER_PAID + "\n")
    assert r.returncode == 2 and "at least one" in r.stderr
    r = match("-f", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "missing.json" in r.stderr
    assert match("-p", "{}", "extra").returncode == 2
    assert match("--no-such-option").returncode == 2


def test_match_bad_event_line_keeps_going():
    stdin = "\n".join([ORDER_PAID, "{not json", ORDER_PAID, '["PAID"]', "", REFUND]) + "\n"
    r = match("-p", '{"detail":{"status":["PAID"]}}', stdin=stdin)
    assert r.returncode == 1
    assert r.stdout == "true\nfalse\ntrue\nfalse\nfalse\nfalse\n"
    assert r.stderr.splitlines() == ["esmd match: line %d: not a JSON object" % n
                                     for n in (2, 4, 5)]


def test_match_answers_each_line_before_eof():
    """A program can drive `esmd match` line by line through pipes."""
    p = subprocess.Popen([servers.binary("esmd"), "match", "-p", '{"detail":{"status":["PAID"]}}'],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        for event, want in [(ORDER_PAID, "true"), (REFUND, "false"), (ORDER_PAID, "true")]:
            p.stdin.write(event + "\n")
            p.stdin.flush()
            assert p.stdout.readline() == want + "\n"
        p.stdin.close()
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
