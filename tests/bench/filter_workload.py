#!/usr/bin/env python3
"""The filter benchmark's workload (python3 stdlib only): writes events.jsonl, 50,000
EventBridge-style order events of about 540 bytes, one a line, and patterns.jsonl, one
{"set", "name", "pattern"} a line (12 sets: five patterns per operator, two sets of 1,000), into
OUTDIR (default: the current directory). The random generator is seeded, so every run writes the
same files: the figures in README.md and docs/filters.md were measured on them, and the match
counts filter_bench prints must equal theirs. See tests/bench/README.md ("Filter engine").

    python3 tests/bench/filter_workload.py [OUTDIR]
"""
import json
import os
import random
import sys

if len(sys.argv) > 1:
    os.makedirs(sys.argv[1], exist_ok=True)
    os.chdir(sys.argv[1])
R = random.Random(20240601)
N = 50000
regions = ["us-east-1", "us-west-2", "eu-west-1", "ap-south-1", "eu-central-1"]
statuses = ["PENDING", "PAID", "SHIPPED", "DELIVERED", "CANCELLED", "REFUNDED"]
types = ["Order Created", "Order Updated", "Order Shipped", "Payment Failed", "Refund Issued"]
svcs = ["orders", "payments", "shipping", "billing", "crm"]
names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
domains = ["example.com", "example.org", "corp.example.net", "mail.test"]
tiers = ["gold", "silver", "bronze", "free"]
with open("events.jsonl", "w") as f:
    for i in range(N):
        nitems = R.randint(1, 4)
        ev = {
            "version": "0", "id": "%08x-%04x-%04x-%04x-%012x" % (R.getrandbits(32), R.getrandbits(16), R.getrandbits(16), R.getrandbits(16), R.getrandbits(48)),
            "detail-type": R.choice(types), "source": "app." + R.choice(svcs),
            "account": "%012d" % R.randrange(10**12), "time": "2024-%02d-%02dT%02d:%02d:%02dZ" % (R.randint(1, 12), R.randint(1, 28), R.randint(0, 23), R.randint(0, 59), R.randint(0, 59)),
            "region": R.choice(regions), "resources": ["arn:aws:app:%s:%012d:order/o-%d" % (R.choice(regions), R.randrange(10**12), i)],
            "detail": {
                "orderId": "o-%d" % i, "status": R.choice(statuses), "amount": round(R.uniform(0, 2000), 2), "qty": R.randint(1, 50),
                "customer": {"name": R.choice(names), "email": "%s%d@%s" % (R.choice(names), R.randint(1, 999), R.choice(domains)), "tier": R.choice(tiers)},
                "items": [{"sku": "SKU-%05d" % R.randint(0, 99999), "price": round(R.uniform(1, 500), 2)} for _ in range(nitems)],
                "ip": "10.%d.%d.%d" % (R.randint(0, 3), R.randint(0, 255), R.randint(1, 254)),
                "tags": R.sample(["new", "vip", "promo", "bulk", "intl", "gift"], R.randint(0, 3)),
            },
        }
        if R.random() < 0.3:
            ev["detail"]["coupon"] = "C%04d" % R.randint(0, 9999)
        f.write(json.dumps(ev, separators=(",", ":")) + "\n")

P = []
def add(s, pats):
    for i, p in enumerate(pats):
        P.append({"set": s, "name": "%s-%d" % (s, i), "pattern": json.dumps(p, separators=(",", ":"))})
add("EXACT", [{"detail": {"status": ["PAID"]}}, {"source": ["app.orders"], "region": ["us-east-1"]}, {"detail": {"customer": {"tier": ["gold"]}}},
              {"detail-type": ["Refund Issued"]}, {"detail": {"orderId": ["o-4242"]}}])
add("PREFIX", [{"detail": {"orderId": [{"prefix": "o-42"}]}}, {"time": [{"prefix": "2024-03"}]}, {"region": [{"prefix": "eu-"}]},
               {"detail": {"items": {"sku": [{"prefix": "SKU-0000"}]}}}, {"detail": {"customer": {"email": [{"prefix": "alice1"}]}}}])
add("SUFFIX", [{"detail": {"customer": {"email": [{"suffix": ".org"}]}}}, {"detail": {"orderId": [{"suffix": "99"}]}},
               {"region": [{"suffix": "-1"}]}, {"detail-type": [{"suffix": "Failed"}]}, {"detail": {"items": {"sku": [{"suffix": "7"}]}}}])
add("EQUALS_IGNORE_CASE", [{"detail": {"status": [{"equals-ignore-case": "paid"}]}}, {"detail-type": [{"equals-ignore-case": "ORDER CREATED"}]},
                           {"detail": {"customer": {"name": [{"equals-ignore-case": "ALICE"}]}}}, {"source": [{"equals-ignore-case": "APP.CRM"}]},
                           {"detail": {"customer": {"tier": [{"equals-ignore-case": "Gold"}]}}}])
add("WILDCARD", [{"detail": {"customer": {"email": [{"wildcard": "*@example.*"}]}}}, {"resources": [{"wildcard": "arn:aws:app:eu-*:*:order/o-1*"}]},
                 {"detail": {"orderId": [{"wildcard": "o-*7*"}]}}, {"time": [{"wildcard": "2024-0*-1*Z"}]}, {"detail": {"items": {"sku": [{"wildcard": "SKU-*99"}]}}}])
add("ANYTHING-BUT", [{"detail": {"status": [{"anything-but": ["PAID", "SHIPPED"]}]}}, {"region": [{"anything-but": ["us-east-1"]}]},
                     {"detail": {"customer": {"tier": [{"anything-but": ["free"]}]}}}, {"source": [{"anything-but": ["app.orders", "app.crm"]}]},
                     {"detail-type": [{"anything-but": ["Order Created"]}]}])
add("NUMERIC", [{"detail": {"amount": [{"numeric": [">", 1000]}]}}, {"detail": {"qty": [{"numeric": [">=", 10, "<", 20]}]}},
                {"detail": {"items": {"price": [{"numeric": ["<", 5]}]}}}, {"detail": {"amount": [{"numeric": [">", 100, "<=", 110]}]}}, {"detail": {"qty": [{"numeric": ["=", 42]}]}}])
add("EXISTS", [{"detail": {"coupon": [{"exists": True}]}}, {"detail": {"coupon": [{"exists": False}], "status": ["PAID"]}},
               {"detail": {"customer": {"phone": [{"exists": False}]}}}, {"detail": {"tags": [{"exists": True}]}}, {"detail": {"missing": [{"exists": True}]}}])
add("CIDR", [{"detail": {"ip": [{"cidr": "10.0.0.0/16"}]}}, {"detail": {"ip": [{"cidr": "10.1.128.0/17"}]}}, {"detail": {"ip": [{"cidr": "10.2.3.0/24"}]}},
             {"detail": {"ip": [{"cidr": "10.3.0.0/20"}]}}, {"detail": {"ip": [{"cidr": "192.168.0.0/16"}]}}])
add("COMBO", [{"source": ["app.orders"], "detail": {"status": ["PAID", "SHIPPED"], "customer": {"tier": ["gold", "silver"]}, "orderId": [{"prefix": "o-1"}]}},
              {"region": [{"prefix": "us-"}], "detail": {"items": {"sku": [{"prefix": "SKU-1"}]}, "customer": {"email": [{"wildcard": "*@example.com"}]}}},
              {"detail-type": ["Payment Failed"], "detail": {"customer": {"name": [{"anything-but": ["alice", "bob"]}]}, "coupon": [{"exists": True}]}},
              {"detail": {"tags": ["vip"], "status": [{"equals-ignore-case": "delivered"}]}},
              {"account": [{"prefix": "0"}], "detail": {"customer": {"tier": ["gold"]}, "tags": ["promo", "gift"]}}])
# scale: many exact patterns on one field (quamina/ruler claim ~O(1) in #patterns)
add("EXACT_1000", [{"detail": {"orderId": ["o-%d" % (i * 37)]}} for i in range(1000)])
add("PREFIX_1000", [{"detail": {"customer": {"email": [{"prefix": "%s%d@" % (names[i % 10], i)}]}}} for i in range(1000)])
with open("patterns.jsonl", "w") as f:
    for p in P:
        f.write(json.dumps(p) + "\n")
print("events", N, "patterns", len(P))
