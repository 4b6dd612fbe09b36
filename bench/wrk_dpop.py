"""Driving ``wrk`` with DPoP: every request needs a fresh proof, so proofs are
made before the timed run (one file per wrk thread, each proof used once) and a
Lua script hands them out. Shared by the HTTP benchmarks."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from bastion.identity.dpop import DpopKey

THREADS = 2
_LUA = """
local proofs, n, auth = {}, 0, nil
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  auth = args[1]
  if args[2] == "dpop" then
    for line in io.lines("@HOME@/proofs-" .. id .. ".txt") do proofs[#proofs + 1] = line end
  end
end
function request()
  n = n + 1
  local headers = {["Authorization"] = auth, ["Content-Type"] = "application/json"}
  if #proofs > 0 then headers["DPoP"] = proofs[n] end
  return wrk.format("@METHOD@", nil, headers, @BODY@)
end
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prepare(
    home: Path,
    *,
    method: str,
    body: str | None = None,
    key: DpopKey | None = None,
    url: str = "",
    token: str = "",
    per_thread: int = 0,
) -> None:
    """Write the Lua script (and, with ``key``, the proofs) into ``home``."""
    script = _LUA.replace("@HOME@", str(home)).replace("@METHOD@", method)
    (home / "bench.lua").write_text(script.replace("@BODY@", f"'{body}'" if body else "nil"))
    for thread in range(THREADS if key else 0):
        assert key is not None
        proofs = (key.proof(method, url, access_token=token) for _ in range(per_thread))
        (home / f"proofs-{thread}.txt").write_text("\n".join(proofs) + "\n")


def run_wrk(home: Path, url: str, clients: int, seconds: int, auth: str, *, dpop: bool) -> str:
    """wrk's report of ``seconds`` of load with ``clients`` keep-alive connections."""
    return subprocess.run(
        ["wrk", f"-t{THREADS}", f"-c{clients}", f"-d{seconds}s", "--latency",
         "-s", str(home / "bench.lua"), url, "--", auth, "dpop" if dpop else "plain"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
