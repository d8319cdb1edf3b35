"""Claims of the README and docs/reliability.md that had no test: each one here fails if the claim breaks.

- ``MPEMD_MAX_PIXELS`` from the environment sets the decoder's pixel limit (and Pillow's);
- the 8x aspect cap: MPEMD's geometry centre-crops the long side to at most 8x the short one;
- ``mpemd demo --fresh --seed N``: the seed reaches the data, the split and the training; fresh clears
  exactly the derived folders;
- ``mpemd sql --bins``: the bins asked for are the bins answered, and bad edges are refused;
- ``mpemd ingest --reference``: manifests point at the source images, nothing is copied, every
  referenced image decodes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.aspect_bins import aspect_bin_labels
from model.networks import backbone_config
from model.preprocess import MAX_PATCH_ASPECT, aspect_preserving_resize, limit_aspect
from tasks.core import storage
from tests.analysis_fixture import NIMA_VERSION, write_root

REPO = Path(__file__).resolve().parents[1]


def test_max_pixels_comes_from_the_environment(tmp_path):
    def png(width: int, height: int) -> Path:
        path = tmp_path / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (10, 20, 30)).save(path)
        return path

    script = """
import sys
from PIL import Image
from tasks.core.images import MAX_PIXELS, ImageError, probe_image
print(MAX_PIXELS, Image.MAX_IMAGE_PIXELS)
for path in sys.argv[1:]:
    try:
        info = probe_image(open(path, "rb").read())
        print("ok", info.width, info.height)
    except ImageError as exc:
        print("refused", exc.reason)
"""
    env = {**os.environ, "MPEMD_MAX_PIXELS": "1000"}
    out = subprocess.run([sys.executable, "-c", script, str(png(30, 30)), str(png(40, 30))], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    assert out[0] == "1000 1000"  # the decoder's limit and Pillow's own
    assert out[1] == "ok 30 30"  # 900 pixels
    assert out[2].startswith("refused decompression bomb") and "1200" in out[2]  # 1200 > 1000


@pytest.mark.parametrize("shape", [(50, 20000), (20000, 50), (100, 900), (100, 800), (100, 790), (64, 64)])
def test_the_8x_aspect_cap_crops_the_long_side_around_the_centre(shape):
    h, w = shape
    image = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w).expand(3, h, w)
    capped = limit_aspect(image)
    ch, cw = capped.shape[-2:]
    assert max(ch, cw) / min(ch, cw) <= MAX_PATCH_ASPECT == 8
    assert min(ch, cw) == min(h, w)  # the short side is never cut
    if max(h, w) <= 8 * min(h, w):
        assert capped.shape == image.shape  # within the cap: untouched
    centre = image[0, h // 2, w // 2]
    assert (capped[0] == centre).any()  # the crop keeps the middle
    resized = aspect_preserving_resize(image.to(torch.uint8), backbone_config("mobilenet_v3_small", 64))
    rh, rw = resized.shape[-2:]
    assert max(rh, rw) / min(rh, rw) <= MAX_PATCH_ASPECT + 0.1  # rounding of the resize only


def test_demo_seed_and_fresh_reach_the_flow(tmp_path, monkeypatch):
    import flows.reproduce as reproduce_module
    from flows.cli import main

    seen = []
    monkeypatch.setattr(reproduce_module, "run_flow", lambda flow, params: seen.append(params) or {"report": "r"})
    assert main(["demo", "--size", "tiny", "--seed", "3", "--fresh", "--root", str(tmp_path / "demo")]) == 0
    (params,) = seen
    assert (params.synth_seed, params.split_seed, params.overrides["seed"], params.fresh) == (3, 3, 3, True)
    assert params.root == str(tmp_path / "demo")
    assert main(["demo", "--size", "tiny", "--root", str(tmp_path / "demo")]) == 0
    assert (seen[1].synth_seed, seen[1].fresh) == (0, False)  # the defaults

    # fresh removes exactly the derived folders; anything else under the root stays.
    root = tmp_path / "root"
    for name in (*reproduce_module.DERIVED_FOLDERS, "my-notes"):
        (root / name).mkdir(parents=True)
        (root / name / "f.txt").write_text("x")
    reproduce_module._clear_derived(str(root))
    assert sorted(p.name for p in root.iterdir()) == ["my-notes"]


def test_sql_bins_are_the_bins_answered(tmp_path, capfd):
    from flows import sql_cli

    root = str(tmp_path / "root")
    write_root(root)
    edges = [0, 0.8, 1.25, math.inf]
    args = ["errors_by_aspect_bin", "--root", root, "--param", f"model_version={NIMA_VERSION}", "--param", "model=nima",
            "--format", "json"]
    assert sql_cli.main([*args, "--bins", "0,0.8,1.25,inf"]) == 0
    rows = json.loads(capfd.readouterr().out)  # DuckDB writes to file descriptor 1
    assert [r["bin"] for r in rows] == [*aspect_bin_labels(edges), "all"]
    assert sum(r["n"] for r in rows[:-1]) == rows[-1]["n"] > 0  # every image in exactly one of the bins
    assert sql_cli.main([*args, "--bins", "1,0.5"]) != 0  # not increasing: refused before any query
    assert capfd.readouterr().err.strip()


def test_ingest_reference_end_to_end(tmp_path):
    from flows.cli import main
    from tasks.core.images import decode_image
    from tasks.ingest.manifests import read_manifest_table
    from tasks.ingest.synth import synthesize_ava

    src = tmp_path / "src"
    synthesize_ava(str(src), 24, seed=1, workers=1)
    root = tmp_path / "root"
    assert main(["ingest", "--labels", str(src / "AVA.txt"), "--images", str(src / "images"), "--root", str(root),
                 "--reference"]) == 0
    rows = [r for split in ("train", "val", "test") for r in read_manifest_table(str(root), split).to_pylist()]
    assert len(rows) == 24
    assert all(Path(r["uri"]).parent == src / "images" for r in rows)  # referenced where they are
    assert not (root / "ava" / "images").exists() or not any((root / "ava" / "images").iterdir())  # not copied
    for r in rows[:5]:
        assert decode_image(storage.read_bytes(r["uri"])).size == (r["width"], r["height"])
