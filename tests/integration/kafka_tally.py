"""What the Kafka tests on a real broker share: a Tally of deliveries per partition, a background
Producer, a one-mapping config and the wait for committed offsets (tests/integration/
test_kafka_broker.py, test_faults.py)."""

import threading
import time

from servers import wait_for


class Tally:
    """Installed as the endpoint's behaviour: counts the Kafka records of every request as it
    arrives, then drops the request's body and parsed JSON.

    Per partition: frontier[p] = n means offsets 0..n-1 have all been delivered at least once;
    dups[p] counts deliveries of offsets already delivered; a first delivery above the frontier
    (a gap: the partition's first deliveries out of offset order) is counted in `gaps`, kept
    aside and absorbed once the frontier reaches it."""

    def __init__(self, endpoint, topic):
        self.topic = topic
        self.lock = threading.Condition()
        self.frontier = {}
        self.dups = {}
        self.ahead = {}
        self.gaps = 0
        self.wrong_topic = 0
        self.records = 0
        self.requests = 0
        self.examples = []  # the first few anomalies, for the failure message
        endpoint.behaviour = self._on_request

    def _note(self, what):
        if len(self.examples) < 20:
            self.examples.append(what)

    def _on_request(self, req):
        ev = req.json if isinstance(req.json, dict) else {}
        groups = ev.get("records") or {}
        with self.lock:
            self.requests += 1
            for key, recs in groups.items():
                for rec in recs:
                    self._one(key, rec)
            self.lock.notify_all()
        req.body = b""
        req.json = None
        return None  # the endpoint's default answer

    def _one(self, key, rec):
        p, o = rec["partition"], rec["offset"]
        self.records += 1
        if rec["topic"] != self.topic or key != "%s-%d" % (self.topic, p):
            self.wrong_topic += 1
            self._note("record of %s under %s" % (rec["topic"], key))
            return
        f = self.frontier.get(p, 0)
        ahead = self.ahead.setdefault(p, set())
        if o < f or o in ahead:
            self.dups[p] = self.dups.get(p, 0) + 1
        elif o == f:
            f += 1
            while f in ahead:
                ahead.discard(f)
                f += 1
            self.frontier[p] = f
        else:
            self.gaps += 1
            ahead.add(o)
            self._note("partition %d: offset %d first delivered while %d was not yet" % (p, o, f))

    def delivered(self):
        with self.lock:
            return sum(self.frontier.values()) + sum(len(a) for a in self.ahead.values())

    def lost(self, hw):
        """Offsets below the watermarks never delivered."""
        with self.lock:
            return sum(max(0, high - self.frontier.get(p, 0) -
                           len([o for o in self.ahead.get(p, ()) if o < high]))
                       for p, high in hw.items())

    def duplicates(self):
        with self.lock:
            return sum(self.dups.values())

    def wait_complete(self, hw, timeout, what="every offset delivered"):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not all(self.frontier.get(p, 0) >= high for p, high in hw.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    short = {p: (self.frontier.get(p, 0), high) for p, high in hw.items()
                             if self.frontier.get(p, 0) < high}
                    raise AssertionError(
                        "timed out after %ds waiting for %s: partitions (delivered, end) %s; "
                        "%d requests, %d records; anomalies %s" % (
                            timeout, what, short, self.requests, self.records, self.examples))
                self.lock.wait(min(left, 0.2))

    def report(self, name, hw):
        lost, dups = self.lost(hw), self.duplicates()
        print("\n%s: %d records at the end of %d partitions; %d deliveries in %d requests; "
              "lost %d, duplicates %d, out of order %d" % (
                  name, sum(hw.values()), len(hw), self.records, self.requests, lost, dups,
                  self.gaps))
        return lost, dups

    def assert_in_order(self, hw):
        with self.lock:
            assert self.wrong_topic == 0, self.examples
            assert self.gaps == 0, "first deliveries out of offset order: %s" % self.examples
            assert set(self.frontier) <= set(hw), \
                "records of partitions %s, not in the topic" % (set(self.frontier) - set(hw))
            for p, high in hw.items():
                assert self.frontier.get(p, 0) == high, \
                    "partition %d: offsets 0..%d delivered, the partition ends at %d" % (
                        p, self.frontier.get(p, 0) - 1, high)


def kafka_cfg(broker, topic, group, url, mapping, batch_size=100, window="100ms",
              max_concurrency=10, timeout="10s", properties=None):
    conn = {"type": "kafka", "bootstrap_servers": broker.bootstrap}
    if properties:
        conn["properties"] = dict(properties)
    return {
        "connections": {"broker": conn},
        "functions": {"fn": {"url": url, "timeout": timeout, "max_concurrency": max_concurrency}},
        "mappings": [{
            "name": mapping,
            "function": "fn",
            "source": {"kafka": "broker", "topics": [topic], "consumer_group": group,
                       "starting_position": "trim_horizon"},
            "batch_size": batch_size,
            "maximum_batching_window": window,
        }],
    }


def wait_committed(broker, group, topic, expected, timeout=60):
    last = {}

    def done():
        last["v"] = broker.committed(group, topic)
        return last["v"] == expected

    try:
        wait_for(done, timeout, 0.5, "committed offsets %s" % expected)
    except TimeoutError:
        raise AssertionError("group %s committed %s after %ds, the partitions end at %s" % (
            group, last.get("v"), timeout, expected))


class Producer(threading.Thread):
    """Produces `chunk` records at a time to `topic` until stop(); counts what was produced."""

    def __init__(self, broker, topic, partitions, chunk=1000, pause=0.05, size=100):
        super().__init__(daemon=True)
        self.broker, self.topic, self.partitions = broker, topic, partitions
        self.chunk, self.pause, self.size = chunk, pause, size
        self.produced = 0
        self.error = None
        self._halt = threading.Event()

    def run(self):
        try:
            while not self._halt.is_set():
                self.produced += self.broker.produce(self.topic, count=self.chunk,
                                                     size=self.size,
                                                     partitions=self.partitions, keyed=True)
                self._halt.wait(self.pause)
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        self._halt.set()
        self.join(180)
        assert not self.is_alive(), "the producer did not stop"
        if self.error:
            raise self.error
        return self.produced
