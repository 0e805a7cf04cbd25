"""A plain handler for asynchronous invocations. The event says what to do:
    {"fail_times": N}   raise for the first N invocations of this event (counted by "id" in a
                        file next to the record file, so it survives the runtime being restarted)
    {"sleep": S}        sleep S seconds first (past AWS_LAMBDA_FUNCTION_TIMEOUT: the RIE answers
                        "Task timed out after N.00 seconds" and restarts the runtime)
Every invocation is recorded before anything else happens."""

import json
import os
import time

from _record import record


class OrderFailed(Exception):
    pass


def _count(event_id):
    path = os.environ["ESMD_TEST_RECORD_FILE"] + ".counts"
    counts = {}
    if os.path.exists(path):
        with open(path) as f:
            counts = json.load(f)
    counts[event_id] = counts.get(event_id, 0) + 1
    with open(path, "w") as f:
        json.dump(counts, f)
    return counts[event_id]


def handler(event, context):
    n = _count(str(event.get("id")))
    record(context, event, attempt=n)
    if event.get("sleep"):
        time.sleep(float(event["sleep"]))
    if n <= int(event.get("fail_times", 0)):
        raise OrderFailed("attempt %d of event %s failed" % (n, event.get("id")))
    return {"ok": event.get("id"), "attempt": n}
