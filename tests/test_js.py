"""JavaScript deployment: transformers.js (npm @huggingface/transformers on onnxruntime-node)
loads a 'dqtool export' folder as written (graphs under onnx/, <graph>.onnx_data, config's
transformers.js_config) and generates exactly the greedy tokens of dqtool's ONNX runtime.

The package is installed once with ``npm install --ignore-scripts`` (its install script
would download CUDA files; the CPU binaries ship in the package) into ``.cache/js`` at the
repository root (git-ignored) and reused by later runs.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dqtool.formats.manifest import write_manifest
from dqtool.qmath.scheme import QuantScheme
from dqtool.runtimes.ort import load_onnx
from dqtool.stages.export import ExportConfig, export
from tiny import pack_tiny, tiny_config

TRANSFORMERS_JS = "4.3.2"  # the version verified here (onnxruntime-node 1.24+)
ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / ".cache" / "js"
SCRIPT = Path(__file__).parent / "js" / "generate.mjs"


def _installed_version() -> str | None:
    pkg = JS_DIR / "node_modules" / "@huggingface" / "transformers" / "package.json"
    return json.loads(pkg.read_text())["version"] if pkg.is_file() else None


@pytest.fixture(scope="module")
def js_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not on PATH: the JavaScript deployment test needs Node 18+")
    if _installed_version() != TRANSFORMERS_JS:
        JS_DIR.mkdir(parents=True, exist_ok=True)
        (JS_DIR / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error",
                        f"@huggingface/transformers@{TRANSFORMERS_JS}"], cwd=JS_DIR, check=True, timeout=600)
    assert _installed_version() == TRANSFORMERS_JS
    # onnxruntime-node's CPU binding is in the package itself (no install script needed).
    binding = list((JS_DIR / "node_modules" / "onnxruntime-node" / "bin").rglob("onnxruntime_binding.node"))
    assert binding, "onnxruntime-node ships no prebuilt binding"
    return JS_DIR / "node_modules"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    return _make_packed(tmp_path_factory.mktemp("js"))


def _make_packed(root: Path) -> Path:
    """A packed 8-8-8 tiny BART whose weights are large enough (init std 0.2) for greedy
    decoding to produce varied tokens (at the default 0.02 every step picks the same one)."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    config = tiny_config("bart", 2, 2)
    config.init_std = 0.2
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    return pack_tiny(root, model, QuantScheme.from_wea("8-8-8", act_symmetric=False))


def _node_generate(modules: Path, folder: Path, ids, mask, max_new_tokens: int, tmp: Path) -> np.ndarray:
    req = tmp / "request.json"
    req.write_text(json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                               "max_new_tokens": max_new_tokens}))
    env = {**os.environ, "DQTOOL_JS_MODULES": str(modules)}
    r = subprocess.run(["node", str(SCRIPT), str(folder), str(req)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.array(json.loads(r.stdout.strip().splitlines()[-1])["sequences"])


@pytest.mark.parametrize("external_data", ["per-graph", "shared"])
def test_transformers_js_generates_dqtool_tokens(js_modules, packed, tmp_path, external_data):
    out = tmp_path / "export"
    export(packed, out, ExportConfig(external_data=external_data))
    assert not list(out.glob("*.onnx"))  # the graphs are under onnx/, where transformers.js looks
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 300, (3, 10), generator=g)
    ids[:, -1] = 2  # </s>
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 1  # <pad>
    ids[1, 5] = 2
    rt, _ = load_onnx(out)
    expected = np.asarray(rt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=1,
                                      do_sample=False))
    got = _node_generate(js_modules, out, ids, mask, 12, tmp_path)
    assert len(np.unique(expected[:, 1:])) >= 3  # a non-degenerate output, so equality means something
    assert got.tolist() == expected.tolist()
    if external_data == "shared":
        # A folder in the layout of earlier exports (graphs and weights.onnx_data at the root)
        # still loads in dqtool's runtime, with the same tokens.
        for f in (out / "onnx").iterdir():
            f.rename(out / f.name)
        (out / "onnx").rmdir()
        write_manifest(out, "export", inputs={}, config={})  # what an earlier export wrote for that layout
        old, _ = load_onnx(out)
        assert np.asarray(old.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=1,
                                       do_sample=False)).tolist() == expected.tolist()
