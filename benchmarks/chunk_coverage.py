"""Photo chunks against row chunks on MVTec bottle's real patches: how far every patch lies from the bank.

    python benchmarks/chunk_coverage.py

Bottle's 209 training photos at the defaults (481,536 patches, 1% bank). The bank of the chunked
coreset with chunks of whole photos (the fit's since issue 20) and with contiguous row chunks
(before), over chunk sizes of 40,000-60,000 patches and coreset seeds 0-2. Prints, per bank, the
coverage radius (the farthest any patch lies from its nearest bank vector: one patch's distance),
the 99.9th percentile and the mean of those distances.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle" / "train" / "good"


def main() -> None:
    from patchcore import PatchCore
    from patchcore.engine.chunks import merge_chunks, reduce_store
    from patchcore.engine.coreset import Chunking, coreset_size, select_coreset
    from patchcore.engine.search import MemoryBankIndex

    model = PatchCore()
    banks: dict[str, np.ndarray] = {}
    with model.extract_patches(sorted(BOTTLE.glob("*.png"))) as store:
        size = coreset_size(len(store), model.coreset_ratio, model.max_bank_size)
        patches = store.read(0, len(store))
        for chunk_size in (40_000, 48_384, 55_000, 60_000):
            banks[f"rows, chunks of {chunk_size}"] = select_coreset(store, size, exact_limit=0, chunk_size=chunk_size)
            settings = model.coreset_settings()
            banks[f"photos, chunks of ~{chunk_size}"] = merge_chunks(
                reduce_store(store, settings, Chunking(chunk_size=chunk_size), 0), settings).indices
        for seed in (1, 2):
            settings = replace(model.coreset_settings(), seed=seed)
            banks[f"photos, seed {seed}"] = merge_chunks(reduce_store(store, settings, Chunking(), 0), settings).indices
            banks[f"rows, seed {seed}"] = select_coreset(store, size, exact_limit=0, seed=seed)
        banks["plain greedy (no chunks)"] = select_coreset(store, size, exact_limit=len(store))
    print(f"{len(patches):,} patches, bank {size:,}")
    print("| bank | coverage radius | 99.9th percentile | mean |")
    print("| --- | ---: | ---: | ---: |")
    for name, kept in banks.items():
        index = MemoryBankIndex(patches[kept])
        distances = np.concatenate([index.search(patches[start : start + 8192], 1)[0][:, 0]
                                    for start in range(0, len(patches), 8192)])
        print(f"| {name} | {distances.max():.3f} | {np.quantile(distances, 0.999):.3f} | {distances.mean():.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
