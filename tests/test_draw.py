"""Plan drawings: produced, non-empty, naming every tenant; a layout where fused
members share a row and nothing else overlaps."""

import struct
import sys

import pytest
import torch

import stfuse
from stfuse import zoo
from stfuse.draw import layout
from stfuse.errors import StfuseError

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def bert_pair():
    pytest.importorskip("transformers")
    m1, a1 = zoo.hf_model("bert", 0)
    m2, a2 = zoo.hf_model("bert", 1)
    return stfuse.compile({"bert_left": m1, "bert_right": m2}, {"bert_left": a1, "bert_right": a2})


def test_png_is_written(bert_pair, tmp_path):
    out = bert_pair.plan.draw(tmp_path / "sub" / "plan.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height > width  # two columns, one row per operator
    assert len(data) > 20_000


def test_svg_names_every_tenant_and_group(bert_pair, tmp_path):
    text = bert_pair.plan.draw(tmp_path / "plan.svg").read_text()
    for name in ("bert_left", "bert_right", "layer_norm", "linear +gelu"):
        assert name in text
    for gid in bert_pair.plan.groups:
        assert f">{gid}<" in text or f"{gid}</text>" in text


def test_layout_rows(bert_pair):
    record = bert_pair.plan.record()
    rows = layout(record)
    units = {t: tg["nodes"] for t, tg in record["tenants"].items()}
    for t, nodes in units.items():
        taken = [rows[(t, i)] for i in range(len(nodes))]
        assert len(set(taken)) == len(taken), f"two units of {t} on one row"
        for a, b in record["tenants"][t]["edges"]:
            assert rows[(t, a)] < rows[(t, b)], "edges run downwards"
    group_rows = {}
    for t, nodes in units.items():
        for i, u in enumerate(nodes):
            if u["group"]:
                group_rows.setdefault(u["group"], set()).add(rows[(t, i)])
    assert set(group_rows) == set(bert_pair.plan.groups)
    assert all(len(r) == 1 for r in group_rows.values()), "a group's members share one row"


def test_mixed_tenants_layout_and_loaded_plan(tmp_path):
    """Three tenants, one of them fused with nobody; a loaded artifact's plan lays out alike."""
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    fused = stfuse.compile({"a": zoo.mlp(8, 16, 4), "b": zoo.mlp(8, 16, 4), "c": zoo.cnn(4)},
                           {"a": torch.randn(2, 8), "b": torch.randn(2, 8), "c": torch.randn(2, 3, 8, 8)})
    fused.save(tmp_path / "art")
    loaded = stfuse.load(tmp_path / "art")
    assert layout(loaded.plan.record()) == layout(fused.plan.record())
    text = loaded.plan.draw(tmp_path / "plan.svg").read_text()
    # Each tenant's name is a text element of its own (not just a letter somewhere in the SVG).
    assert all(f">{t}<" in text or f"{t}</text>" in text for t in ("a", "b", "c"))


def test_without_matplotlib(bert_pair, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(StfuseError, match=r"needs matplotlib: pip install 'stfuse\[plot\]'"):
        bert_pair.plan.draw(tmp_path / "plan.png")
