"""Load test of the inference service: N concurrent clients for a bounded time against a real server.

Starts ``patchcore.serving.server.serve`` in a subprocess on a free loopback port (with a small model fitted
here, or ``--model-dir``), runs ``--clients`` concurrent clients posting a PNG for ``--duration``
seconds, then prints throughput, latency percentiles, errors, the server's peak RSS (Linux), and how
fast ``/healthz`` answered meanwhile (a probe every 0.2 s on a connection of its own, with the number
of requests waiting for a scoring slot at that moment): a liveness probe must not queue behind scoring.

    python benchmarks/load_test.py                      # 50 clients, 30 s, a tiny 64 px model
    python benchmarks/load_test.py --clients 50 --duration 20 --size 256 --resize 256 --crop 224
    python benchmarks/load_test.py --clients 80 --max-queue 32   # a full queue: the rest is shed (503)

Not a test: it only reports. The client runs in this process with asyncio + httpx, so on a small
machine it competes with the server for CPU; the figures are end-to-end, as a caller would see them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _image(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], axis=-1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _fit_small_model(directory: Path, size: int, resize: int, crop: int) -> None:
    from patchcore import PatchCore

    PatchCore(coreset_ratio=0.1, resize=resize, crop=crop).fit([_image(size, seed) for seed in range(8)]).save(directory)


def _rss_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples the server's resident memory (VmRSS) and keeps the peak; VmHWM is read at the end too."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kib, self.stop = pid, interval, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kib = max(self.peak_kib, _rss_kib(self.pid, "VmRSS") or 0)
            self.stop.wait(self.interval)


async def _client(http, url: str, body: bytes, until: float, latencies: list, statuses: Counter) -> None:
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            response = await http.post(url, content=body, headers={"content-type": "image/png"})
            statuses[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            elif response.status_code == 503:  # shed: wait as told, as a well-behaved client does
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
        except Exception as exc:  # connection refused / reset / timeout: an error, keep going
            statuses[type(exc).__name__] += 1


def _queue_depth(metrics_text: str) -> float | None:
    """The ``patchcore_inference_queue`` gauge of a Prometheus scrape."""
    for line in metrics_text.splitlines():
        if line.startswith("patchcore_inference_queue "):
            return float(line.split()[1])
    return None


class HealthProbe(threading.Thread):
    """Times ``/healthz`` every 0.2 s on a connection of its own, and notes the scoring queue's depth
    after each probe. A thread, not a task of the clients' event loop: a busy loop would add its own
    delay to the figures. A probe that fails counts as an error (``healthz <status>``)."""

    def __init__(self, base: str, statuses: Counter) -> None:
        super().__init__(daemon=True)
        self.base, self.statuses, self.stop = base, statuses, threading.Event()
        self.probes: list[tuple[float, float | None]] = []  # (seconds, requests waiting)

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=httpx.Timeout(60.0)) as http:
            while not self.stop.wait(0.2):
                started = time.perf_counter()
                try:
                    response = http.get(self.base + "/healthz")
                    seconds = time.perf_counter() - started
                    if response.status_code != 200:
                        self.statuses[f"healthz {response.status_code}"] += 1
                    else:
                        self.probes.append((seconds, _queue_depth(http.get(self.base + "/metrics").text)))
                except Exception as exc:  # a timeout is what this probe is here to catch
                    self.statuses[f"healthz {type(exc).__name__}"] += 1


async def _run_clients(url: str, body: bytes, clients: int, duration: float, statuses: Counter
                       ) -> tuple[list[float], float]:
    import httpx

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as http:
        started = time.perf_counter()
        until = started + duration
        await asyncio.gather(*(_client(http, url, body, until, latencies, statuses) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default: 30)")
    parser.add_argument("--model-dir", type=Path, help="serve this model instead of fitting a small one")
    parser.add_argument("--size", type=int, default=128, help="side of the posted test image (default: 128)")
    parser.add_argument("--resize", type=int, default=64, help="resize of the fitted small model (default: 64)")
    parser.add_argument("--crop", type=int, default=64, help="crop of the fitted small model (default: 64)")
    parser.add_argument("--map", action="store_true", help="ask for the heat map too (map=true)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="the service's --max-queue (default: 64, as the service); fewer than --clients fills it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="patchcore-load-") as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(scratch) / "small"
            print(f"fitting a small model (resize {args.resize}, crop {args.crop}) ...", flush=True)
            _fit_small_model(model_dir, args.size, args.resize, args.crop)
        port = _free_port()
        code = (
            "import sys; from patchcore.serving.server import serve; "
            f"serve({str(model_dir)!r}, host='127.0.0.1', port={port}, log_level='warning', max_queue={args.max_queue})"
        )
        env = dict(os.environ)
        server = subprocess.Popen([sys.executable, "-c", code], env=env)
        try:
            import httpx

            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    print(f"server exited with status {server.returncode}", file=sys.stderr)
                    return 1
                try:
                    if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print("server did not become healthy", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            name = httpx.get(base + "/v1/models").json()["models"][0]["name"]
            buffer = io.BytesIO()
            Image.fromarray(_image(args.size, 99)).save(buffer, format="PNG")
            url = f"{base}/v1/models/{name}/predict" + ("?map=true" if args.map else "")
            idle_rss = _rss_kib(server.pid, "VmRSS")
            sampler = RssSampler(server.pid)
            sampler.start()
            print(f"{args.clients} clients for {args.duration:g} s against {url} ({len(buffer.getvalue())} byte PNG, "
                  f"{args.size}x{args.size}) ...", flush=True)
            statuses: Counter = Counter()
            probe = HealthProbe(base, statuses)
            probe.start()
            latencies, elapsed = asyncio.run(_run_clients(url, buffer.getvalue(), args.clients, args.duration, statuses))
            probe.stop.set()
            probe.join()
            probes = probe.probes
            sampler.stop.set()
            sampler.join()
            hwm = _rss_kib(server.pid, "VmHWM")
            healthy = httpx.get(base + "/healthz", timeout=5).status_code == 200
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()

    ok, shed = statuses.get(200, 0), statuses.get(503, 0)
    errors = sum(count for key, count in statuses.items() if key not in (200, 503))
    print(f"requests        {ok + shed + errors} in {elapsed:.1f} s ({ok} ok, {shed} shed with 503, {errors} errors: "
          f"{dict(statuses)})")
    print(f"throughput      {ok / elapsed:.1f} images/s")
    if latencies:
        p50, p95, p99 = np.percentile(np.array(latencies) * 1000.0, [50, 95, 99])
        print(f"latency         p50 {p50:.0f} ms   p95 {p95:.0f} ms   p99 {p99:.0f} ms   max {max(latencies) * 1000:.0f} ms")
    if idle_rss is not None:
        peak = max(sampler.peak_kib, hwm or 0)
        print(f"server RSS      idle {idle_rss / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")
    if probes:
        waiting = [depth for _, depth in probes if depth is not None]
        p50, p95 = np.percentile(np.array([seconds for seconds, _ in probes]) * 1000.0, [50, 95])
        print(f"/healthz        p50 {p50:.1f} ms   p95 {p95:.1f} ms   max {max(s for s, _ in probes) * 1000:.1f} ms "
              f"({len(probes)} probes under load; requests waiting for a slot: median "
              f"{np.median(waiting) if waiting else float('nan'):.0f}, max {max(waiting, default=float('nan')):.0f} "
              f"of --max-queue {args.max_queue})")
    print(f"healthy after   {healthy}")
    return 0 if errors == 0 and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
