"""A throwaway PostgreSQL cluster on loopback, for benchmarks and tests (python3 stdlib only).

    with PgTmp() as pg:
        print(pg.url)          # postgresql://esmd@127.0.0.1:PORT/esmd

initdb and pg_ctl come from $PG_BINDIR, else `pg_config --bindir`, else the newest
/usr/lib/postgresql/*/bin. When run as root the server runs as the `postgres` user (via
`runuser -u postgres --`): the temporary directory is chowned to it. The cluster listens on
127.0.0.1 only, with its unix socket inside the temporary directory, trusts local connections
and runs with fsync off: it is for measuring and testing, never for data.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago (the usual race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_bindir():
    env = os.environ.get("PG_BINDIR")
    if env:
        return env
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[-2].split(".")],
    )
    for d in reversed(candidates):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        d = out.stdout.strip()
        if out.returncode == 0 and os.path.exists(os.path.join(d, "initdb")):
            return d
    except FileNotFoundError:
        pass
    raise RuntimeError("initdb not found: set PG_BINDIR or install postgresql")


class PgTmp:
    """Starts on start() (or `with`), stops and deletes everything on stop()."""

    def __init__(self, dbname="esmd", user="esmd", port=None, bindir=None, keep=False,
                 settings=None):
        self.dbname = dbname
        self.user = user
        self.port = port or free_port()
        self.bindir = bindir or find_bindir()
        self.keep = keep
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
        }
        self.settings.update(settings or {})
        self.tmpdir = None
        self.datadir = None
        self.logfile = None
        self.started = False

    @property
    def url(self):
        return "postgresql://%s@127.0.0.1:%d/%s" % (self.user, self.port, self.dbname)

    def _prefix(self):
        if os.geteuid() != 0:
            return []
        return ["runuser", "-u", "postgres", "--"]

    def _run(self, args):
        cmd = self._prefix() + [os.path.join(self.bindir, args[0])] + args[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=self.tmpdir)
        if out.returncode != 0:
            log = ""
            if self.logfile and os.path.exists(self.logfile):
                with open(self.logfile, errors="replace") as f:
                    log = f.read()[-4000:]
            raise RuntimeError("%s failed (%d): %s%s\n%s" % (" ".join(cmd), out.returncode,
                                                             out.stdout, out.stderr, log))
        return out.stdout

    def start(self):
        self.tmpdir = tempfile.mkdtemp(prefix="esmd-pg-")
        self.datadir = os.path.join(self.tmpdir, "data")
        self.logfile = os.path.join(self.tmpdir, "postgres.log")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.tmpdir, pw.pw_uid, pw.pw_gid)
        try:
            self._run(["initdb", "-D", self.datadir, "-U", self.user, "--auth=trust",
                       "-E", "UTF8", "--no-sync", "--locale=C"])
            opts = " ".join("-c %s=%s" % kv for kv in self.settings.items())
            opts += " -p %d -k %s" % (self.port, self.tmpdir)
            self._run(["pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60",
                       "-o", opts, "start"])
            self.started = True
            self._run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                       self.dbname])
        except Exception:
            self.stop()
            raise
        return self

    def stop(self):
        if self.started:
            try:
                self._run(["pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop"])
            except RuntimeError:
                pass
            self.started = False
        if self.tmpdir and not self.keep:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    import time

    with PgTmp() as pg:
        print(pg.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
