"""Large bodies beside small calls: how long /healthz and a small chat call
take while large, slow-to-scan bodies are being processed.

usage: python3 benches/heavy.py BASE_URL KEY [LARGE_CALLS] [EMAILS]

BASE_URL is the gateway's root (http://127.0.0.1:PORT); KEY a client key of
a sharing project with `privacy_guard = "block"`. LARGE_CALLS threads each
send one chat call whose message is `"a@b.co " * EMAILS` (80,000: 560 KB,
the guard's worst case before its scan was made linear); meanwhile the main
thread probes /healthz every 20 ms and sends a small chat call every 100 ms,
until the large calls have answered. Prints one JSON object: the probes'
and small calls' p50 and worst latencies in ms, during the large calls and
for the same number of probes with nothing else running.
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse


def request(base, method, path, key=None, body=None):
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    start = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, (time.perf_counter() - start) * 1000


def small(base, key):
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Hi"}]})
    return request(base, "POST", "/v1/chat/completions", key, body)


def probe_while(base, key, running):
    probes, calls, n = [], [], 0
    while running():
        probes.append(request(base, "GET", "/healthz")[1])
        if n % 5 == 0:
            calls.append(small(base, key)[1])
        n += 1
        time.sleep(0.02)
    return probes, calls


def stats(values):
    values = sorted(values)
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(values[len(values) // 2], 2),
            "max_ms": round(values[-1], 2)}


def main():
    base, key = sys.argv[1], sys.argv[2]
    large_calls = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    emails = int(sys.argv[4]) if len(sys.argv) > 4 else 80_000
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "a@b.co " * emails}]})
    for _ in range(20):  # warm up: connections, caches
        small(base, key)
    idle_probes, idle_calls = [], []
    for n in range(50):
        idle_probes.append(request(base, "GET", "/healthz")[1])
        if n % 5 == 0:
            idle_calls.append(small(base, key)[1])
    results = []

    def large():
        results.append(request(base, "POST", "/v1/chat/completions", key, body))

    threads = [threading.Thread(target=large) for _ in range(large_calls)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    probes, calls = probe_while(base, key, lambda: any(t.is_alive() for t in threads))
    for t in threads:
        t.join()
    print(json.dumps({
        "large_calls": large_calls, "large_body_kb": len(body) // 1024,
        "large_statuses": sorted({s for s, _ in results}),
        "large_wall_ms": round((time.perf_counter() - start) * 1000, 1),
        "healthz_during": stats(probes), "small_call_during": stats(calls),
        "healthz_idle": stats(idle_probes), "small_call_idle": stats(idle_calls),
    }))


if __name__ == "__main__":
    main()
