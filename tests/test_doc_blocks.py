"""The Python blocks of README.md and docs/*.md run as written: each file's blocks in
order, in one namespace, with the user's default tune="measure".

The README is what a new user copies first; a block that no longer runs is a
broken promise the rest of the suite does not see (tenants compiled at batch 2
and 3, as its quick start has them, crashed a measured compile for two sessions;
docs/artifact.md compiled a GPT-2 that returns its KV cache, which cannot trace).
The names the blocks take as given (``m1``, ``x1``, ``bert``, ``ids``, ``models``...)
are defined here from small random-weight transformers models, consistently with
the README's own use of them: ``m1``/``x1`` are the BERT tenant and its ids,
``m2``/``x2`` the ResNet and its images.
"""

import re
from pathlib import Path

import pytest
import torch

from stfuse.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))

# Where a block cannot run as written here, the text it runs instead, and why.
SUBSTITUTE = {
    # Inductor's compile of the program takes tens of seconds on the 2-core CPU;
    # tests/test_inductor.py runs codegen="inductor"
    'codegen="inductor"': 'codegen="direct"',
}
# Files whose blocks need a device this machine may lack (launch.tuning(), which
# docs/cuda.md shows, is run by tests/test_launch.py, test_arena.py and test_graphs.py).
NEEDS_CUDA = {"docs/cuda.md"}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5 and "stfuse.compile(" in blocks[0]


def _names() -> dict:
    """What the blocks take as given: small models, their inputs, and for the docs that
    continue the README's story, a compiled pair and its artifact (``pair.stfuse``, in
    the working directory)."""
    T = pytest.importorskip("transformers")
    import stfuse

    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)).eval()
    vit = T.ViTModel(T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)).eval()
    resnet = T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).eval()
    gpt2 = T.GPT2Model(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    img = torch.randn(3, 3, 16, 16)  # another batch size than the ids: the quick start's case
    img_24 = torch.randn(2, 3, 24, 24)
    return {"torch": torch, "stfuse": stfuse, "bert": bert, "vit": vit, "resnet": resnet, "gpt2": gpt2,
            "ids": ids, "mask": mask, "img": img, "img_24": img_24,
            "m1": bert, "m2": resnet, "x1": ids, "x2": img, "model": resnet, "x": img,
            "model_a": resnet, "model_b": resnet, "bert_a": bert, "bert_b": bert,
            "models": {"bert": bert, "resnet": resnet},
            "example_inputs": {"bert": (ids,), "resnet": (img,)}}


def _run(path: str, namespace: dict) -> dict:
    for i, block in enumerate(python_blocks((ROOT / path).read_text())):
        for text, instead in SUBSTITUTE.items():
            block = block.replace(text, instead)
        try:
            exec(compile(block, f"{path} python block {i}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - named with the block
            raise AssertionError(f"{path} python block {i} failed: {type(err).__name__}: {err}\n{block}") from err
    return namespace


@pytest.mark.slow
def test_the_readme_blocks_run_and_answer_as_the_models_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the artifact block writes pair.stfuse here
    monkeypatch.delenv("STFUSE_TUNE", raising=False)  # a user's default ("measure"), not the suite's model
    ns = _run("README.md", _names())
    # what the blocks left: the runtime's answer and the loaded artifact's are the models' own
    with torch.no_grad():
        want_bert, want_resnet = ns["bert"](ns["ids"]).last_hidden_state, ns["resnet"](ns["img"]).pooler_output
    assert_close(ns["y"].last_hidden_state, want_bert)
    assert_close(ns["y1"].last_hidden_state, want_bert)
    assert_close(ns["y2"].pooler_output, want_resnet)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in FILES if p != "README.md"])
def test_the_docs_blocks_run(path, tmp_path, monkeypatch):
    if path in NEEDS_CUDA and not torch.cuda.is_available():
        pytest.skip(f"{path} runs on CUDA")
    blocks = python_blocks((ROOT / path).read_text())
    if not blocks:
        pytest.skip(f"{path} has no python block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STFUSE_TUNE", raising=False)
    namespace = _names()
    if "pair.stfuse" in "".join(blocks) or "fused" in "".join(blocks):  # the README's pair, saved
        fused = namespace["stfuse"].compile([namespace["m1"], namespace["m2"]], [(namespace["x1"],), (namespace["x2"],)])
        fused.save("pair.stfuse")
        namespace.update(fused=fused, inputs=(namespace["x1"], namespace["x2"]))
    _run(path, namespace)
