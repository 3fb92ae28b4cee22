"""The HTTP API on every front-end process (`jaxengine serve --api-server-count 3`): the
kernel spreads HTTP connections over the processes listening on the port, each answers with
the engine's tokens, and /metrics through any of them is the whole server's."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import jaxengine
from tests.serving.openai_api.conftest import scrape
from tests.serving.serve_process import FRONTEND_PIDS, ServeProcess
from tests.serving.tiny_model import ENGINE_ARGS

PROMPT = [5, 6, 7, 8]
N = 12


def _pids_with_connections(pids: list[int], port: int) -> set[int]:
    """Which of `pids` hold an established TCP connection on local `port` (Linux /proc)."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":
                established.add(cols[9])  # the socket's inode
    holders = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:[") and target[8:-1] in established:
                holders.add(pid)
    return holders


def test_http_on_three_front_ends(tiny_model):
    want = jaxengine.generate([PROMPT], jaxengine.SamplingParams(max_tokens=8, temperature=0.0), model=str(tiny_model),
                              **ENGINE_ARGS)[0].outputs[0].token_ids
    srv = ServeProcess("--api-server-count", "3", model=str(tiny_model), http=True)
    try:
        srv.wait_ready()
        pids = [srv.proc.pid] + [int(p) for p in srv.wait_for(FRONTEND_PIDS, 5).group(1).split(",")]
        body = json.dumps(dict(model=str(tiny_model), prompt=PROMPT, max_tokens=8, temperature=0.0,
                               return_token_ids=True))
        conns = [http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60) for _ in range(N)]
        got = []
        for c in conns:  # each a connection of its own, kept open (keep-alive) until checked below
            c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = c.getresponse()
            assert resp.status == 200
            got.append(json.loads(resp.read())["choices"][0]["token_ids"])
        holders = _pids_with_connections(pids, srv.http_port)
        for c in conns:
            c.close()
        assert got == [list(want)] * N
        assert len(holders) >= 2, f"{N} HTTP connections all reached one of the processes {pids}: {holders}"

        # Any process's /metrics (a new connection each time: wherever the kernel puts it) is the sum.
        for _ in range(6):
            m = scrape(srv.http_port)
            assert m["jaxengine:e2e_request_latency_seconds_count"] == N
            assert m["jaxengine:generation_tokens_total"] == N * 8
    finally:
        srv.close()
