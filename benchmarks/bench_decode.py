"""Decoding photos, and hiding it behind the network: libspng against Pillow (prints figures; not a test).

    python benchmarks/bench_decode.py                    # about 5 minutes on 2 cores
    python benchmarks/bench_decode.py --reps 5 --photos 48

Every "before" is measured in the same run as its "after", alternating rep by rep; figures are
medians over the reps, with ratios. Before: Pillow decodes every PNG (``png_decoding.ENABLED``
off) and the service decodes each upload inside its inference slot (the runner's flow until
now, rebuilt here); after: PNGs through libspng (``imagecodecs``), uploads decoded in the
service's own decode pool before they take a slot.

1. Decoding, ms per photo: ``read_image`` on MVTec bottle PNGs (900x900) and VisA macaroni1
   JPEGs (decoded at the DCT scale the default model needs, as ``predict`` does; the same with
   either setting), then the bare decoders on the bottle PNGs (pyspng too where installed) and
   how long each keeps another Python thread waiting for the GIL while it decodes.
2. ``predict`` at the defaults (efficientnet_lite2, whole photo at shorter side 384, 1% bank),
   fitted on ``--train`` bottle photos: latency (one photo per call) and throughput (all in one
   call), photos given as files, full-size maps included; and the fit itself.
3. The service (in process, ASGI, one inference slot as on 2 cores): one client (latency), then
   4 concurrent clients (throughput), each posting bottle PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from patchcore.engine import detector, images, png_decoding
from patchcore.engine.images import read_image
from patchcore.errors import ImageLoadError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BOTTLE = SHARED / "mvtec" / "bottle"
MACARONI = SHARED / "visa" / "macaroni1"
CLIENTS = 4


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def _median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def _row(label: str, before: tuple[float, float], after: tuple[float, float], unit: str,
         higher_is_better: bool = False) -> None:
    """One line: the figure before and after with its ratio, then the CPU time per photo (all the
    process's threads; steady on a busy machine, where wall times are not) with its ratio."""
    (figure_before, cpu_before), (figure_after, cpu_after) = before, after
    ratio = figure_after / figure_before if higher_is_better else figure_before / figure_after
    print(f"  {label:42s} {figure_before:7.1f} -> {figure_after:7.1f} {unit:6s} x{ratio:.2f}   "
          f"CPU {cpu_before:6.1f} -> {cpu_after:6.1f} ms/photo x{cpu_before / cpu_after:.2f}")


def _alternate(reps: int, measure: Callable[[bool], tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Medians of ``measure(fast)`` (a figure, CPU ms per photo) over ``reps`` alternating
    before/after runs."""
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(reps):
        for fast in (False, True):
            png_decoding.ENABLED = fast
            results[fast].append(measure(fast))
    png_decoding.ENABLED = True
    before, after = ([statistics.median(values) for values in zip(*results[fast])] for fast in (False, True))
    return (before[0], before[1]), (after[0], after[1])


def _timed(work: Callable[[], object], photos: int) -> tuple[float, float]:
    """(wall seconds, process CPU ms per photo) of ``work()``."""
    cpu, started = time.process_time(), time.perf_counter()
    work()
    return time.perf_counter() - started, 1000.0 * (time.process_time() - cpu) / photos


# -- 1. decoding ------------------------------------------------------------------------------------


def bench_reading(bottle: list[Path], macaroni: list[Path], reps: int, needed_size) -> None:
    print("1. read_image, ms per photo (medians)                wall before -> after          CPU (this thread)")
    for label, photos in ((f"bottle PNG 900x900 ({len(bottle)} photos)", bottle),
                          (f"macaroni1 JPEG, DCT-scaled ({len(macaroni)})", macaroni)):
        def per_photo(fast: bool, photos: list[Path] = photos) -> tuple[float, float]:
            wall, cpu = [], []
            for photo in photos:
                started, thread = time.perf_counter(), time.thread_time()
                read_image(photo, needed_size=needed_size)
                wall.append(time.perf_counter() - started)
                cpu.append(time.thread_time() - thread)
            return _median_ms(wall), _median_ms(cpu)

        _row(label, *_alternate(reps, per_photo), "ms")


def _pillow(data: bytes):
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return opened


def _decoders() -> dict[str, Callable[[bytes], object]]:
    decoders: dict[str, Callable[[bytes], object]] = {"Pillow": _pillow}
    if png_decoding.imagecodecs is not None:
        decoders["libspng (imagecodecs)"] = png_decoding.imagecodecs.spng_decode
    try:
        import pyspng

        decoders["libspng (pyspng)"] = pyspng.load
    except ImportError:
        pass
    return decoders


def _runs_beside(decode: Callable[[bytes], object], data: bytes, decodes: int = 8) -> float:
    """Share of a decode's time during which another Python thread kept running (median over
    ``decodes``): about 0 for a decoder that holds the GIL, which stalls every other thread."""
    turns, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            turns[0] += 1

    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)  # hand the GIL over promptly, so that only a held GIL stops the spinner
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        before, started = turns[0], time.perf_counter()
        time.sleep(0.3)
        rate = (turns[0] - before) / (time.perf_counter() - started)
        shares = []
        for _ in range(decodes):
            before, started = turns[0], time.perf_counter()
            decode(data)
            shares.append((turns[0] - before) / (rate * (time.perf_counter() - started)))
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(switch)
    return statistics.median(shares)


def bench_decoders(bottle: list[Path], reps: int) -> None:
    datas = [photo.read_bytes() for photo in bottle]
    decoders = _decoders()
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(reps):
        for data in datas:
            for name, decode in decoders.items():
                started = time.thread_time()
                decode(data)
                times[name].append(time.thread_time() - started)
    pillow = _median_ms(times["Pillow"])
    print("   bare decoders on bottle PNGs: CPU ms per photo, and the share of a decode's time another Python "
          "thread keeps running (0%: the GIL is held)")
    for name, samples in times.items():
        print(f"  {name:42s} {_median_ms(samples):7.1f} ms  x{pillow / _median_ms(samples):.2f}   "
              f"other thread runs {100.0 * _runs_beside(decoders[name], datas[0]):4.0f}%")


# -- 2. predict and fit -----------------------------------------------------------------------------


def bench_predict(train: list[Path], test: list[Path], reps: int, folder: Path):
    from patchcore import PatchCore

    print(f"2. predict at the defaults, bottle, fitted on {len(train)} photos (medians)")
    fits: dict[bool, tuple[float, float]] = {}
    model = None
    for fast in (False, True):
        png_decoding.ENABLED = fast
        cpu, started = time.process_time(), time.perf_counter()
        model = PatchCore().fit(train)
        fits[fast] = time.perf_counter() - started, 1000.0 * (time.process_time() - cpu) / len(train)
    png_decoding.ENABLED = True
    model.save(folder)
    model.predict(test[:2])  # warm-up
    latency_photos = test[: max(4, len(test) // 2)]

    def latency(fast: bool) -> tuple[float, float]:
        def one_per_call() -> None:
            for photo in latency_photos:
                model.predict([photo])

        wall, cpu = _timed(one_per_call, len(latency_photos))
        return 1000.0 * wall / len(latency_photos), cpu

    waits: dict[bool, list[float]] = {False: [], True: []}

    def throughput(fast: bool) -> tuple[float, float]:
        waited = _waiting_for_batches()
        try:
            wall, cpu = _timed(lambda: model.predict(test), len(test))
        finally:
            detector.iterate_batches = images.iterate_batches
        waits[fast].append(1000.0 * sum(waited) / len(test))
        return len(test) / wall, cpu

    _row(f"latency, one photo per call ({len(latency_photos)})", *_alternate(reps, latency), "ms")
    _row(f"throughput, all {len(test)} in one call", *_alternate(reps, throughput), "img/s", higher_is_better=True)
    print(f"  {'  its main thread waiting for decoded photos':42s} {statistics.median(waits[False]):7.1f} -> "
          f"{statistics.median(waits[True]):7.1f} ms/photo (the first batch's decoding, which nothing can hide, included)")
    _row(f"fit on {len(train)} photos (one run each)", fits[False], fits[True], "s")


def _waiting_for_batches() -> list[float]:
    """Have ``predict`` time each wait of its main thread for the next decoded batch; the list fills."""
    waited: list[float] = []

    def timed(*args, **kwargs):
        batches = images.iterate_batches(*args, **kwargs)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            waited.append(time.perf_counter() - started)
            if batch is None:
                return
            yield batch

    detector.iterate_batches = timed
    return waited


# -- 3. the service ---------------------------------------------------------------------------------


def _decode_in_slot_runner(runner):
    """The runner as it was: admitted, then decoded and scored together inside a slot."""
    from patchcore.serving.inference import InferenceRunner

    class DecodeInSlot(InferenceRunner):
        async def score(self, served, data, name, want_map, want_overlay, want_mask, evidence=0):
            queued = time.perf_counter()

            def in_slot():
                started = time.perf_counter()
                try:
                    photo = self.decode(served, data, name)
                except ImageLoadError as error:
                    raise self.refusal(error) from None
                timings = {"queue": started - queued, "decode": time.perf_counter() - started}
                return self._score_now(served, photo, name, want_map, want_overlay, want_mask, evidence, timings)

            return await self.run(in_slot)

    return DecodeInSlot(runner.metrics, runner.slots, runner.max_queue, runner.max_image_pixels,
                        runner.max_input_pixels, runner.max_map_side)


def bench_service(folder: Path, photos: list[Path], reps: int) -> None:
    import httpx

    from patchcore.serving.app import create_app

    print(f"3. the service, one slot, bottle PNG uploads, map=true ({len(photos)} per run)")
    app = create_app({"bottle": folder}, inference_slots=1, max_queue=64)
    runners = {True: app.state.runner, False: _decode_in_slot_runner(app.state.runner)}
    bodies = [photo.read_bytes() for photo in photos]

    async def post_all(clients: int) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as http:
            queue = list(bodies)

            async def client() -> None:
                while queue:
                    body = queue.pop()
                    answer = await http.post("/v1/models/bottle/predict?map=true", content=body,
                                             headers={"content-type": "image/png"})
                    answer.raise_for_status()

            await asyncio.gather(*(client() for _ in range(clients)))

    def run(clients: int, fast: bool) -> tuple[float, float]:
        app.state.runner = runners[fast]
        return _timed(lambda: asyncio.run(post_all(clients)), len(bodies))

    asyncio.run(post_all(1))  # warm-up

    def latency(fast: bool) -> tuple[float, float]:
        wall, cpu = run(1, fast)
        return 1000.0 * wall / len(bodies), cpu

    def throughput(fast: bool) -> tuple[float, float]:
        wall, cpu = run(CLIENTS, fast)
        return len(bodies) / wall, cpu

    _row("latency, one client", *_alternate(reps, latency), "ms")
    _row(f"throughput, {CLIENTS} concurrent clients", *_alternate(reps, throughput), "img/s", higher_is_better=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=24, help="test photos per measurement")
    parser.add_argument("--train", type=int, default=20, help="bottle photos the model is fitted on")
    parser.add_argument("--reps", type=int, default=3, help="alternating before/after repetitions")
    parser.add_argument("--skip", default="", help="sections to leave out, e.g. predict,service")
    args = parser.parse_args()
    if not BOTTLE.is_dir() or not MACARONI.is_dir():
        raise SystemExit(f"needs MVTec bottle at {BOTTLE} and VisA macaroni1 at {MACARONI}")
    if not png_decoding.available():
        raise SystemExit("libspng is not installed: pip install 'patchcore[fast-png]'")
    from patchcore.engine.geometry import InputTransform

    train = sorted((BOTTLE / "train" / "good").glob("*.png"))
    test = sorted((BOTTLE / "test").glob("*/*.png"))[:: 3][: args.photos]
    macaroni = sorted((MACARONI / "test").rglob("*.JPG"))[: args.photos] or sorted(MACARONI.rglob("*.jpg"))[: args.photos]
    print(_load())
    needed_size = InputTransform(384, None, (0.5,) * 3, (0.5,) * 3).needed_size
    bench_reading(test, macaroni, args.reps, needed_size)
    bench_decoders(test[:12], args.reps)
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "bottle"
        if "predict" not in skip:
            bench_predict(train[: args.train], test, args.reps, folder)
        if "service" not in skip and folder.exists():
            bench_service(folder, test, args.reps)
    print(_load())


if __name__ == "__main__":
    main()
