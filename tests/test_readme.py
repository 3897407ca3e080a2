"""README.md's Python blocks run as written, in order, in one namespace.

The README is what a new user copies first; a block that no longer runs is a
broken promise the rest of the suite does not see (tenants compiled at batch 2
and 3, as its quick start has them, crashed a measured compile for two sessions).
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

README = Path(__file__).resolve().parents[1] / "README.md"

# Where a block cannot run as written here, the text it runs instead, and why.
SUBSTITUTE = {
    # Inductor's compile of the program takes tens of seconds on the 2-core CPU;
    # tests/test_inductor.py runs codegen="inductor"
    'codegen="inductor"': 'codegen="direct"',
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5 and "stfuse.compile(" in blocks[0]


def _names() -> dict:
    transformers = pytest.importorskip("transformers")
    import stfuse

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).eval()
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).eval()
    resnet = transformers.ResNetModel(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    img = torch.randn(3, 3, 16, 16)  # another batch size than the ids: the quick start's case
    img_24 = torch.randn(2, 3, 24, 24)
    return {"torch": torch, "stfuse": stfuse, "bert": bert, "vit": vit, "resnet": resnet,
            "ids": ids, "mask": mask, "img": img, "img_24": img_24, "m1": bert, "m2": resnet, "x1": ids, "x2": img,
            "models": {"bert": bert, "resnet": resnet},
            "example_inputs": {"bert": (ids,), "resnet": (img,)}, "model": resnet}


@pytest.mark.slow
def test_every_python_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the artifact block writes pair.stfuse here
    monkeypatch.delenv("STFUSE_TUNE", raising=False)  # a user's default ("measure"), not the suite's model
    namespace = _names()
    for i, block in enumerate(python_blocks(README.read_text())):
        for text, instead in SUBSTITUTE.items():
            block = block.replace(text, instead)
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - named with the block
            raise AssertionError(f"README.md python block {i} failed: {type(err).__name__}: {err}\n{block}") from err
    # what the blocks left: the runtime's answer and the loaded artifact's are the models' own
    bert, resnet, ids, img = (namespace[k] for k in ("bert", "resnet", "ids", "img"))
    with torch.no_grad():
        want_bert, want_resnet = bert(ids).last_hidden_state, resnet(img).pooler_output
    assert_close(namespace["y"].last_hidden_state, want_bert)
    assert_close(namespace["y1"].last_hidden_state, want_bert)
    assert_close(namespace["y2"].pooler_output, want_resnet)
