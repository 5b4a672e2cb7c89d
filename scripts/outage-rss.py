#!/usr/bin/env python3
"""RSS of a release sidecar while Redis is away and N distinct keys are written (issue 13's
bounded-memory figure; docs/benchmarks.md "Repair queue under a long Redis outage").

    eval "$(scripts/local-services | grep -E '^export ')"
    psql "$WTC_DATABASE_URL" -c 'CREATE TABLE rss_t (id text PRIMARY KEY, n integer, version bigint NOT NULL DEFAULT 0)'
    # a config with [redis] url = "redis://127.0.0.1:1" (nothing listens) and the entity accounts -> rss_t
    env -u WTC_REDIS_URL target/release/wtc-sidecar --config rss.toml > out.log &
    scripts/outage-rss.py 127.0.0.1:PORT $! 300000
"""
import http.client, sys, threading, time
addr, pid, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = addr.split(":")
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
def metric(name):
    c = http.client.HTTPConnection(host, int(port)); c.request("GET", "/metrics"); body = c.getresponse().read().decode()
    for l in body.splitlines():
        if l.startswith(name + " ") : return l.split()[1]
next_key = [0]; lock = threading.Lock(); statuses = {}
def worker():
    c = http.client.HTTPConnection(host, int(port))
    while True:
        with lock:
            i = next_key[0]; next_key[0] += 1
        if i >= total: return
        c.request("PUT", f"/v1/entities/accounts/k{i}", body=b'{"n":1}', headers={"Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        statuses[r.status] = statuses.get(r.status, 0) + 1
print(f"start: RSS {rss():.1f} MiB")
threads = [threading.Thread(target=worker) for _ in range(8)]
t0 = time.time()
for t in threads: t.start()
marks = [50_000, 100_000, 150_000, 200_000, 300_000, 500_000, 1_000_000]
while any(t.is_alive() for t in threads):
    time.sleep(2)
    done = next_key[0]
    print(f"{time.time()-t0:6.1f} s  {min(done,total):8d} writes  RSS {rss():6.1f} MiB  queue {metric('wtc_repair_queue_depth')}  overflows {metric('wtc_repair_queue_overflows_total')}", flush=True)
print("statuses", statuses)
print(f"end: RSS {rss():.1f} MiB")
