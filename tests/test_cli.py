import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from patchcore.cli.main import build_parser, main
from patchcore.engine.persistence import model_sha256


def test_help_is_complete(capsys):
    for command in ([], ["fit"], ["predict"], ["demo"], ["backbones"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command + ["--help"])
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--backbone", "--layers", "--coreset-ratio", "--weights", "--seed", "MODEL_DIR", "OUT_DIR"):
        assert option in text
    assert {"fit", "predict", "demo", "backbones"} <= set(build_parser()._subparsers._group_actions[0].choices)


def test_fit_then_predict_writes_scores_and_overlays(tmp_path, product_images, capsys):
    train = str(product_images["train"][0].parent)
    assert main(["fit", train, "-o", str(tmp_path / "model"), "--coreset-ratio", "0.25", "--resize", "64", "--crop", "64", "--backbone", "efficientnet_lite0"]) == 0
    inputs = [str(p) for p in product_images["good"] + product_images["defective"]]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    code = main(["predict", str(tmp_path / "model"), *inputs, str(broken), "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1 and "broken.jpg" in captured.err  # the bad image is reported ...
    assert "64 per image" in captured.out  # fit: a 64x64 input at stride 8 is an 8x8 grid of patches
    assert f"{len(inputs)} images in" in captured.out and "ms per image" in captured.out  # predict's timing
    with open(tmp_path / "out" / "scores.csv") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["path", "score", "is_anomalous", "error", "model_sha256"]  # as with --ray
    assert {r["model_sha256"] for r in rows} == {model_sha256(tmp_path / "model")}
    failed = [r for r in rows if r["error"]]
    assert [(r["path"], r["score"]) for r in failed] == [(str(broken), "")]  # ... has a row saying why ...
    rows = [r for r in rows if not r["error"]]
    assert [r["path"] for r in rows] == inputs  # ... and every other image is scored
    # Verdicts out of the box: the fit's threshold is self-calibrated from its own photos.
    assert [r["is_anomalous"] for r in rows] == ["0"] * 4 + ["1"] * 4
    scores = {r["path"]: float(r["score"]) for r in rows}
    assert min(scores[p] for p in inputs[4:]) > max(scores[p] for p in inputs[:4])
    overlay = Image.open(tmp_path / "out" / "overlays" / "bad_0.png.png")
    assert overlay.size == (64 + 8 + 64, 64)
    # The defect is redder than the rest in the heat map half.
    heat = np.asarray(overlay)[:, 72:].astype(int)
    assert heat[27, 31, 0] - heat[27, 31, 2] > heat[5, 5, 0] - heat[5, 5, 2]


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "absent"), "x.png", "-o", str(tmp_path / "out")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", str(empty), "-o", str(tmp_path / "m"), "--backbone", "efficientnet_lite0"]) == 2
    assert "holds no images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", str(empty), "-o", str(tmp_path / "m"), "--coreset-ratio", "2", "--backbone", "efficientnet_lite0"])


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "patchcore.cli", "backbones"], capture_output=True, text=True, check=True)
    assert "efficientnet_lite0" in result.stdout and "wide_resnet50_2" in result.stdout


def test_fit_with_calibration_flags_defects_in_predict(tmp_path, product_images, capsys):
    train = str(product_images["train"][0].parent)
    good = [str(p) for p in product_images["good"]]
    assert main(["fit", train, "-o", str(tmp_path / "model"), "--resize", "64", "--crop", "64",
                 "--calibrate", *good, "--max-fpr", "0", "--backbone", "efficientnet_lite0"]) == 0
    assert "threshold" in capsys.readouterr().out
    inputs = [str(p) for p in product_images["defective"]]
    assert main(["predict", str(tmp_path / "model"), *inputs, "-o", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["is_anomalous"] for r in rows] == ["1"] * 4
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "bad_0.png.png"))
    assert mask.shape == (64, 64) and mask[27, 31] == 255 and mask[2, 2] == 0


def test_predict_decodes_each_photo_once_and_keeps_extensions_in_output_names(tmp_path, product_images, monkeypatch):
    import PIL.Image

    train = str(product_images["train"][0].parent)
    assert main(["fit", train, "-o", str(tmp_path / "model"), "--coreset-ratio", "0.25", "--resize", "64",
                 "--backbone", "efficientnet_lite0", "--calibrate", *map(str, product_images["good"])]) == 0
    source = Image.open(product_images["defective"][0])
    inputs = []
    for extension in ("tif", "webp", "bmp"):
        path = tmp_path / f"x.{extension}"
        source.save(path, lossless=True) if extension == "webp" else source.save(path)
        inputs.append(str(path))
    opened = []
    original_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or original_open(fp, *a, **k))
    assert main(["predict", str(tmp_path / "model"), *inputs, "-o", str(tmp_path / "out")]) == 0
    assert sorted(opened) == sorted(inputs)  # scores, maps, overlays and masks from one decode each
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["x.bmp.png", "x.tif.png", "x.webp.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["x.bmp.png", "x.tif.png", "x.webp.png"]


def test_the_package_sets_a_passive_openmp_wait_policy_unless_the_user_chose_one():
    import os

    code = "import patchcore, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"


def test_ray_options_without_ray_say_how_to_install_it(tmp_path, product_images):
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from patchcore.cli.main import main\n"
        f"print('exit', main(['fit-many', {str(product_images['root'][0])!r}, '-o', {str(tmp_path / 'm')!r}, '--ray']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().endswith("exit 2"), result.stderr
    assert "pip install 'patchcore[ray]'" in result.stderr


def test_serve_creates_a_private_teach_in_token_file_and_passes_the_teach_in_options(tmp_path, monkeypatch, capsys):
    import stat

    import patchcore.serving.server as server
    from patchcore.serving.teach_tokens import read_tokens

    calls = []
    monkeypatch.setattr(server, "serve", lambda model, **options: calls.append((model, options)))
    tokens = tmp_path / "config" / "tokens"
    assert main(["serve", str(tmp_path), "--max-queue", "0", "--port", "9001", "--teach-token-file", str(tokens),
                 "--allow-origin", "https://qc.example", "--teach-max-images", "3"]) == 0
    assert f"needs a token from {tokens} (created now" in capsys.readouterr().out
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600 and list(read_tokens(tokens).values()) == ["supervisor"]
    assert main(["serve", str(tmp_path), "--teach-token-file", str(tokens)]) == 0
    assert "created now" not in capsys.readouterr().out  # the same file, the same token
    assert main(["serve", str(tmp_path), "--no-teach-in"]) == 0
    (model, first), (_, second), (_, off) = calls
    assert model == str(tmp_path) and first["port"] == 9001 and first["max_queue"] == 0
    assert first["teach_token_file"] == second["teach_token_file"] == str(tokens)
    assert first["allowed_origins"] == ["https://qc.example"] and first["teach_max_images"] == 3
    assert off["teach_token_file"] is None and off["max_queue"] == 64
    assert main(["teach-token", "alice", "--file", str(tokens)]) == 0
    token = capsys.readouterr().out.splitlines()[-1]
    assert read_tokens(tokens)[token] == "alice"
    assert main(["teach-token", "alice", "--file", str(tokens)]) == 2  # one token per name


def test_max_bank_size_takes_a_count_or_none_for_no_cap():
    from patchcore.cli.options import model_settings_from_args

    parse = build_parser().parse_args
    assert model_settings_from_args(parse(["fit", "good", "-o", "m", "--max-bank-size", "none"]))["max_bank_size"] is None
    assert model_settings_from_args(parse(["fit", "good", "-o", "m", "--max-bank-size", "500"]))["max_bank_size"] == 500
    assert "max_bank_size" not in model_settings_from_args(parse(["fit", "good", "-o", "m"]))
    with pytest.raises(SystemExit):
        parse(["fit", "good", "-o", "m", "--max-bank-size", "0"])


def test_overlays_are_written_fast_at_a_low_png_compression_level(tmp_path):
    from patchcore.engine.overlay import save_png

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    save_png(picture, tmp_path / "fast.png")
    picture.save(tmp_path / "default.png")
    with Image.open(tmp_path / "fast.png") as written:
        assert np.array_equal(np.asarray(written), np.asarray(picture))  # lossless
    smooth = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (64, 1)).repeat(3).reshape(64, 64, 3))
    save_png(smooth, tmp_path / "smooth-fast.png")
    smooth.save(tmp_path / "smooth-default.png")
    # Level 1 trades bytes for time: on compressible pictures it writes more than the default.
    assert (tmp_path / "smooth-fast.png").stat().st_size > (tmp_path / "smooth-default.png").stat().st_size


def test_predict_with_ray_refuses_to_add_to_another_models_scores(tmp_path, fitted_model, product_images, capsys):
    from conftest import small_model_settings
    from patchcore import PatchCore

    fitted_model.save(tmp_path / "first")
    PatchCore(**small_model_settings()).fit(product_images["good"]).save(tmp_path / "second")
    image = str(product_images["defective"][0])
    assert main(["predict", str(tmp_path / "first"), image, "-o", str(tmp_path / "out"), "--no-overlays"]) == 0
    before = (tmp_path / "out" / "scores.csv").read_text()
    capsys.readouterr()
    # Refused before Ray starts: the file holds the first model's scores.
    assert main(["predict", str(tmp_path / "second"), image, "-o", str(tmp_path / "out"), "--ray"]) == 2
    message = capsys.readouterr().err
    assert str(tmp_path / "out" / "scores.csv") in message and "another output folder" in message
    assert model_sha256(tmp_path / "first") in message and model_sha256(tmp_path / "second") in message
    assert (tmp_path / "out" / "scores.csv").read_text() == before


def test_every_command_line_parses_where_torch_timm_and_scikit_learn_are_missing():
    # The base install (which serves saved models and exports) has none of them: building the
    # parser of any command must not import them.
    import subprocess
    import sys

    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'timm', 'sklearn'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from patchcore.cli.main import build_parser\n"
        "parser = build_parser()\n"
        "for command in ('fit', 'predict', 'serve', 'watch', 'tune', 'add', 'evaluate'):\n"
        "    assert command in parser.format_help(), command\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
