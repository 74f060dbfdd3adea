"""Hold N streaming calls open at once (for the memory measurement of
benches/gateway.sh): each connection sends one streaming POST, reads until
its first event, then waits. Prints "open N" once all are open, holds them
for HOLD seconds, then closes them.

python3 open_streams.py HOST PORT PATH KEY BODY_FILE N HOLD
"""

import asyncio
import sys

host, port, path, key, body_file, n, hold = sys.argv[1:8]
body = open(body_file, "rb").read()
request = (
    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
).encode() + body


async def one(ready):
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    seen = b""
    while b"data:" not in seen:
        chunk = await reader.read(4096)
        if not chunk:
            raise RuntimeError("closed before the first event: " + seen[:200].decode(errors="replace"))
        seen += chunk
    ready.append(1)
    return writer


async def main():
    ready = []
    writers = []
    for start in range(0, int(n), 100):
        writers += await asyncio.gather(*(one(ready) for _ in range(start, min(start + 100, int(n)))))
    print(f"open {len(ready)}", flush=True)
    await asyncio.sleep(float(hold))
    for w in writers:
        w.close()


asyncio.run(main())
