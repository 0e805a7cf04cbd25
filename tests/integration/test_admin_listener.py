"""The admin listener under abuse (issue 13, defect 1; docs/admin.md "Authentication" and
"Connection limits"): requests without valid credentials are refused from their headers, before
any of their body is read, so that many connections announcing and sending large bodies do not
grow esmd's memory; one client address over `admin.max_connections_per_client` is refused
(429) while other addresses and /healthz are still answered."""

import fcntl
import hashlib
import socket
import struct
import termios

import pytest

import servers

TOKEN = "listener-token"
AKID = "esmd-admin"
SECRET = "s3cr3t/KEY+value"
INVOKE = "/2015-03-31/functions/fn/invocations"


def config(endpoint, **admin):
    return {"admin": dict({"token": TOKEN, "aws_credentials": {"access_key_id": AKID,
                                                               "secret_access_key": SECRET}},
                          **admin),
            "functions": {"fn": {"url": endpoint.url, "timeout": "5s"}}}


def rss_kb(proc):
    with open("/proc/%d/status" % proc.proc.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def port(proc):
    return int(proc.admin.rsplit(":", 1)[1])


def connect(proc, source="127.0.0.1", timeout=20):
    s = socket.create_connection(("127.0.0.1", port(proc)), timeout=timeout,
                                 source_address=(source, 0))
    return s


def read_answer(s):
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def request(proc, method, path, headers=(), body=b"", source="127.0.0.1"):
    """One request on a connection of its own (closed after); returns the raw answer."""
    s = connect(proc, source)
    head = "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n" % (
        method, path, len(body))
    for h in headers:
        head += h + "\r\n"
    s.sendall(head.encode() + b"\r\n" + body)
    out = read_answer(s)
    s.close()
    return out


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def unread(proc, conns):
    """Bytes sent on conns that esmd has not read yet: in the clients' send queues, and in the
    receive queues of esmd's sockets of the admin port (/proc/net/tcp)."""
    left = 0
    for s in conns:
        if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 1:
            continue  # not ESTABLISHED: closed by esmd, what it did not read is dropped
        left += struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port(proc) and fields[3] != "0A":
                left += int(fields[4].split(":")[1], 16)
    return left


def send_some(s, n):
    """Sends up to n bytes of body; stops when the server has closed the connection."""
    chunk = b"x" * 65536
    sent = 0
    try:
        while sent < n:
            sent += s.send(chunk[:min(len(chunk), n - sent)])
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    return sent


@pytest.mark.parametrize("credentials", [
    (),
    ("Authorization: Bearer wrong",),
    # A SigV4 signature that declares its payload hash is checked before the body.
    ("Authorization: AWS4-HMAC-SHA256 Credential=%s/20250101/us-east-1/lambda/aws4_request, "
     "SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=%s" % (AKID, "0" * 64),
     "X-Amz-Date: 20250101T000000Z",
     "X-Amz-Content-Sha256: " + hashlib.sha256(b"").hexdigest()),
])
def test_unauthenticated_bodies_are_not_read(esmd, endpoint, credentials):
    """50 connections announce a 6 MB body and send 2 MB of it, then hold: esmd refuses each from
    its headers and its memory does not grow by the bodies (it grew by about 100 MB when the
    body was read before the credentials were checked)."""
    proc = esmd(config(endpoint))
    before = rss_kb(proc)
    conns = []
    head = ("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 6000000\r\n" % INVOKE)
    for h in credentials:
        head += h + "\r\n"
    for _ in range(50):
        s = connect(proc, timeout=5)
        s.sendall(head.encode() + b"\r\n")
        conns.append(s)
    for s in conns:
        send_some(s, 2 * 1024 * 1024)
    # What was sent has reached esmd: read by it, or dropped with a connection it closed.
    servers.wait_for(lambda: unread(proc, conns) == 0, 30, 0.05, "esmd to take what was sent")
    grown = rss_kb(proc) - before
    assert grown < 40 * 1024, "esmd grew by %d kB" % grown
    answers = [read_answer(s) for s in conns]
    for s in conns:
        s.close()
    for a in answers:
        assert status_of(a) in (401, 403), a[:300]
    assert proc.get("/healthz")[0] == 200


def test_one_address_over_its_cap(esmd, endpoint):
    """admin.max_connections_per_client: 4. A fifth connection of 127.0.0.1 gets /healthz only
    (anything else 429 TooManyRequestsException); 127.0.0.2 is served as usual."""
    proc = esmd(config(endpoint, max_connections_per_client=4))
    auth = ("Authorization: Bearer " + TOKEN, "X-Amz-Invocation-Type: DryRun")
    idle = []
    for _ in range(4):
        s = connect(proc)
        # one answered request each: the connection is surely counted, and kept open
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        idle.append(s)
    a = request(proc, "POST", INVOKE, auth, b"{}")
    assert status_of(a) == 429, a[:300]
    assert b"TooManyRequestsException" in a
    a = request(proc, "GET", "/healthz")
    assert status_of(a) == 200, a[:300]
    a = request(proc, "POST", INVOKE, auth, b"{}", source="127.0.0.2")
    assert status_of(a) == 204, a[:300]
    for s in idle:
        s.close()

    def served():
        return status_of(request(proc, "POST", INVOKE, auth, b"{}")) == 204
    servers.wait_for(served, 10, 0.05, "127.0.0.1 served again")


def test_declared_payload_hash_is_checked_against_the_body(esmd, endpoint):
    """A SigV4 request that declares its payload's hash (X-Amz-Content-Sha256) is authenticated
    from its headers before the body is read — and then its body must have that hash: the
    signature was accepted on the headers alone, so a captured request could otherwise be sent
    again with another body (it was: 202)."""
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials
    import requests

    proc = esmd(config(endpoint))
    url = proc.admin + INVOKE
    signed_body = b'{"amount": 1}'
    req = botocore.awsrequest.AWSRequest(
        method="POST", url=url, data=signed_body,
        headers={"X-Amz-Invocation-Type": "Event",
                 "X-Amz-Content-Sha256": hashlib.sha256(signed_body).hexdigest()})
    botocore.auth.SigV4Auth(botocore.credentials.Credentials(AKID, SECRET), "lambda",
                            "us-east-1").add_auth(req)
    headers = dict(req.headers.items())
    assert "x-amz-content-sha256" in headers["Authorization"]

    swapped = requests.post(url, data=b'{"amount": 1000000}', headers=headers, timeout=10)
    assert swapped.status_code == 403, swapped.text
    assert swapped.headers["x-amzn-ErrorType"] == "InvalidSignatureException"
    assert "does not match the request body" in swapped.text

    honest = requests.post(url, data=signed_body, headers=headers, timeout=10)
    assert honest.status_code == 202, honest.text
    endpoint.wait_for(lambda: len(endpoint.ok_requests()) >= 1, 30, "the signed event")
    assert [r.body for r in endpoint.ok_requests()] == [signed_body]
