"""``patchcore evaluate``: metrics, per-category failures, reports and the command line."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import product_image, small_model_settings
from patchcore import PatchCore
from patchcore.evaluation import metrics
from patchcore.evaluation.datasets import load_mask, load_mvtec_category
from patchcore.cli.main import build_parser
from patchcore.evaluation.evaluate import evaluate_dataset
from patchcore.evaluation.summary import KEYS, format_table

SIZE = 64


def _write_category(root, name, rng, corrupt=False):
    folder = root / name
    for sub in ("train/good", "test/good", "test/blotch", "ground_truth/blotch"):
        (folder / sub).mkdir(parents=True)
    for i in range(10):
        Image.fromarray(product_image(rng, SIZE)).save(folder / "train/good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(product_image(rng, SIZE)).save(folder / "test/good" / f"{i:03d}.png")
        row, col, side = 12 + 10 * i, 20, 14
        Image.fromarray(product_image(rng, SIZE, defect=(row, col, side))).save(folder / "test/blotch" / f"{i:03d}.png")
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[row : row + side, col : col + side] = 255
        Image.fromarray(mask).save(folder / "ground_truth/blotch" / f"{i:03d}_mask.png")
    if corrupt:
        (folder / "train/good" / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(1)
    _write_category(root, "widget", rng)
    _write_category(root, "broken", rng, corrupt=True)
    return root


def _parse(argv):
    return build_parser().parse_args(argv)


def _fast_options():
    s = small_model_settings()
    return ["--resize", str(s["resize"]), "--crop", str(s["crop"]), "--coreset-ratio", str(s["coreset_ratio"]),
            "--batch-size", str(s["batch_size"]), "--backbone", s["backbone"], "--search-backend", s["search_backend"]]


def test_evaluate_command_end_to_end(mvtec_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = _parse(["evaluate", str(mvtec_root), "-o", str(out), "--json", *_fast_options()])
    assert args.handler(args) == 1  # one category failed
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # stdout holds only the JSON
    assert "broken" in captured.err and "005.png" in captured.err
    by_name = {row["category"]: row for row in rows}
    assert [row["category"] for row in rows] == ["broken", "widget", "mean"]

    widget = by_name["widget"]
    assert set(widget) == set(KEYS)
    assert widget["image_auroc"] == 1.0
    assert widget["pixel_auroc"] > 0.9
    # The same model, fitted again, gives the same maps: AUPRO and pixel AUROC recomputed from them agree.
    dataset = load_mvtec_category(mvtec_root, "widget")
    model = PatchCore(**small_model_settings()).fit(dataset.train)
    maps = [p.anomaly_map for p in model.predict([s.path for s in dataset.test])]
    masks = [load_mask(s) for s in dataset.test]
    assert widget["aupro"] == pytest.approx(metrics.aupro(masks, maps), rel=1e-6) and widget["aupro"] > 0.8
    assert widget["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, maps), rel=1e-6)
    assert widget["fit_seconds"] > 0 and widget["ms_per_image"] > 0 and widget["memory_bank_size"] > 0
    assert widget["backbone"] == "efficientnet_lite0" and widget["coreset_ratio"] == 0.25

    broken = by_name["broken"]
    assert set(broken) == set(KEYS) | {"error"} and "005.png" in broken["error"] and broken["image_auroc"] is None

    mean = by_name["mean"]
    assert set(mean) == set(KEYS)
    assert mean["image_auroc"] == widget["image_auroc"] and mean["aupro"] == pytest.approx(widget["aupro"])

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == rows
    with open(out / "metrics.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == [*(key for key in KEYS if key != "defect_image_auroc"), "error"]
        table = list(reader)
    assert [r["category"] for r in table] == ["broken", "widget", "mean"]
    assert float(table[1]["image_auroc"]) == 1.0 and table[0]["error"]

    report = out / "widget" / "report.html"
    text = report.read_text()
    sources = re.findall(r"src='([^']+)'|src=\"([^\"]+)\"", text)
    sources = [a or b for a, b in sources]
    assert "roc.png" in sources and "pro.png" in sources and len(sources) >= 2 + 6
    # Each worst case shown with its evidence: the anomalous patch beside its nearest normal patch.
    assert sum(source.endswith("-evidence.png") for source in sources) == 6 and "nearest normal patch" in text
    for source in sources:
        assert (report.parent / source).is_file(), source
    overlays = sorted(p for p in (out / "widget" / "images").glob("*.png") if not p.name.endswith("-evidence.png"))
    assert len(overlays) == 6
    with Image.open(overlays[0]) as overlay:
        assert overlay.height == SIZE and overlay.width > 2 * SIZE
    assert not (out / "broken" / "report.html").exists()

    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[0] == "category" and any(line.startswith("mean") for line in lines)
    assert re.search(r"widget\s+blotch\s+100\.0", text)  # image AUROC per defect type
    assert "100.0" in text and "error" in text


def test_eval_size_and_single_category_folder(mvtec_root, tmp_path, capsys):
    # Pixel metrics on resized maps and masks give the same ordering as full resolution on this easy data.
    dataset = load_mvtec_category(mvtec_root, "widget")
    result = evaluate_dataset(PatchCore(**small_model_settings()), dataset, None, eval_size=32)
    assert set(KEYS) <= set(result) and result["pixel_eval_size"] == 32
    assert result["image_auroc"] == 1.0 and result["pixel_auroc"] > 0.9 and result["aupro"] > 0.8
    assert 0 < result["pixel_f1_max"] <= 1 and result["image_f1_max"] == 1.0

    # A category folder as ROOT, printed as a table.
    args = _parse(["evaluate", str(mvtec_root / "widget"), "-o", str(tmp_path / "out"), "--eval-size", "48", *_fast_options()])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "widget" in out and out.splitlines()[0].startswith("category")
    per_category = json.loads((tmp_path / "out" / "widget" / "metrics.json").read_text())
    assert per_category["pixel_eval_size"] == 48


def test_pro_area_matches_metrics_aupro():
    rng = np.random.default_rng(0)
    masks = [np.zeros((20, 20), bool) for _ in range(3)]
    masks[0][2:8, 3:9] = True
    masks[1][10:18, 5:7] = True
    maps = [rng.random((20, 20)).astype(np.float32) + m * 0.5 for m in masks]
    fpr, pro = metrics.pro_curve_points(masks, maps)
    assert metrics.area_under_pro(fpr, pro, 0.3) == pytest.approx(metrics.aupro(masks, maps))


def test_evaluate_reads_a_plain_folder_layout_with_per_defect_aurocs(tmp_path, capsys):
    from patchcore.cli.main import main

    rng = np.random.default_rng(5)
    root = tmp_path / "parts"
    shape = (48, 96)  # non-square: pixel metrics must cover every pixel of the photo
    for i in range(10):
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(product_image(rng, shape)).save(root / "train" / f"t{i}.png")
    (root / "good").mkdir()
    for i in range(3):
        Image.fromarray(product_image(rng, shape)).save(root / "good" / f"g{i}.png")
    # "blotch" is obvious; "faint" is the same texture with a slightly darker square: harder.
    for defect, (row, col) in (("blotch", (10, 70)), ("faint", (20, 5))):
        (root / defect).mkdir()
        (root / "masks" / defect).mkdir(parents=True)
        for i in range(3):
            image = product_image(rng, shape, defect=(row, col, 12) if defect == "blotch" else None)
            if defect == "faint":
                image[row : row + 12, col : col + 12] = (image[row : row + 12, col : col + 12] * 0.8).astype(np.uint8)
            Image.fromarray(image).save(root / defect / f"{defect}{i}.png")
            mask = np.zeros(shape, np.uint8)
            mask[row : row + 12, col : col + 12] = 255
            Image.fromarray(mask).save(root / "masks" / defect / f"{defect}{i}.png")
    out = tmp_path / "out"
    assert main(["evaluate", str(root), "-o", str(out), "--resize", "48", "--coreset-ratio", "0.25",
                 "--backbone", "efficientnet_lite0"]) == 0
    table = capsys.readouterr().out
    row = json.loads((out / "parts" / "metrics.json").read_text())
    assert row["n_train"] == 10 and row["n_test_good"] == 3 and row["n_test_defective"] == 6
    assert set(row["defect_image_auroc"]) == {"blotch", "faint"}
    assert row["defect_image_auroc"]["blotch"] == 1.0
    # The overall AUROC is the pooled ranking; each type's is its own against the same good images.
    assert row["image_auroc"] == pytest.approx(np.mean(list(row["defect_image_auroc"].values())))
    assert row["pixel_auroc"] is not None and row["pixel_eval_size"] == "full"
    assert re.search(r"parts\s+blotch\s+100\.0", table) and re.search(r"parts\s+faint\s+\d+\.\d", table)
    report = (out / "parts" / "report.html").read_text()
    assert "Image AUROC per defect type" in report and "faint" in report
