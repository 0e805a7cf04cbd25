"""Faults an operator meets: the database going away while esmd starts, stop signals during
start-up. esmd never gives up on start-up (docs/operations.md#start-up): every start-up step
that needs PostgreSQL waits and retries until it succeeds or a stop signal arrives."""

import os
import subprocess
import time

import pytest

import servers
from servers import wait_for


def redis_mapping_config(postgres, redis, endpoint, stream, name):
    return {
        "postgres": postgres.url,
        "admin": {"listen": "127.0.0.1:0"},
        "connections": {"r": {"type": "redis", "url": redis.url}},
        "functions": {"fn": {"url": endpoint.url, "timeout": "10s"}},
        "mappings": [{"name": name, "function": "fn",
                      "source": {"redis": "r", "stream": stream, "group": "g",
                                 "starting_position": "trim_horizon"},
                      "batch_size": 10, "maximum_batching_window": "50ms"}],
    }


class LockHolder:
    """A psql session that holds `LOCK TABLE name IN ACCESS EXCLUSIVE MODE` until it ends."""

    def __init__(self, postgres, table):
        kw = postgres._popen_kw()
        self.proc = subprocess.Popen(
            [os.path.join(postgres.bindir, "psql"), "-X", "-q", "-At", "-h", "127.0.0.1", "-p",
             str(postgres.port), "-U", "postgres", "-d", postgres.dbname],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=postgres.tmp, **kw)
        self.proc.stdin.write("BEGIN;\nLOCK TABLE %s IN ACCESS EXCLUSIVE MODE;\n"
                              "SELECT 'locked';\n" % table)
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line == "locked", "psql could not take the lock: %r" % line

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def kinesis_records(endpoint):
    """Records of the Kinesis-shaped events that were answered 200."""
    return [rec for req in endpoint.ok_requests() if isinstance(req.json, dict)
            for rec in req.json.get("Records") or []]


def waiting_on_locks(postgres):
    rows = postgres.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    return int(rows[0][0])


@pytest.mark.parametrize("table", ["esmd.mapping_state", "esmd.mapping_overrides"])
def test_postgres_restart_during_start_up_is_waited_out(postgres, redis, endpoint, esmd, names,
                                                        table):
    """A start-up step blocked on a lock when PostgreSQL restarts: esmd retries the step (it
    used to exit 1 with 'could not record mapping state: … the database system is shutting
    down'), comes up and delivers."""
    stream = names.topic()
    cfg = redis_mapping_config(postgres, redis, endpoint, stream, names.mapping())
    proc = esmd(cfg, start=False)
    r = subprocess.run([servers.binary("esmd"), "migrate", "-c", proc.config_path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    holder = LockHolder(postgres, table)
    try:
        proc.start(wait=False)
        wait_for(lambda: waiting_on_locks(postgres) > 0, 30, 0.1,
                 "esmd's start-up to wait on the lock of %s" % table)
        assert proc.running()
        postgres.stop()  # fast shutdown: the lock holder and esmd's session are cut off
        time.sleep(1.0)  # esmd meets a database that refuses connections, then none at all
        assert proc.running(), servers.tail(proc.logfile)
    finally:
        holder.close()
        postgres.start()
    proc.wait_healthy(60)
    log = proc.log()
    assert "database not ready" in log
    assert "exiting with status 1" not in log
    n = 25
    for i in range(n):
        redis.command("XADD", stream, "*", "v", str(i))
    endpoint.wait_for(lambda: len(kinesis_records(endpoint)) >= n, 60, "%d records" % n)
    assert proc.stop() == 0


def test_stop_signal_while_waiting_for_the_database(postgres, endpoint, esmd, names, tmp_path):
    """No database at all: esmd logs that it waits and retries, and SIGTERM ends the wait with
    exit status 0 (a service manager's stop, not a failure)."""
    port = servers.free_port()  # nothing listens there
    cfg = {
        "postgres": "postgresql://postgres@127.0.0.1:%d/esmd?connect_timeout=2" % port,
        "admin": {"listen": "127.0.0.1:0"},
        "functions": {"fn": {"url": endpoint.url}},
    }
    proc = esmd(cfg, start=False)
    proc.start(wait=False)
    wait_for(lambda: proc.log().count("database not ready") >= 2, 30, 0.1,
             "two failed start-up attempts in the log")
    assert proc.running()
    assert proc.stop(timeout=10) == 0
    assert "stopped by SIGTERM before start-up ended" in proc.log()
