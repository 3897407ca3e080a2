"""stfuse/frontend.py: tracing tenants."""

import contextlib
import logging

import re

import pytest
import torch

import stfuse

from conftest import assert_close, check_tenants, float64_call_reference


class BatchBakedIntoView(torch.nn.Module):
    """``reshape(32, -1)`` folds the batch into the reduction dim of the mm: the export
    with a dynamic batch fails (its fake mm sees [32, 256*B] x [256, 8]), the static
    export holds. What a Dynamo graph traced at batch 1 looks like."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(256, 8))

    def forward(self, x):
        return torch.mm(x.reshape(32, -1), self.w)


@contextlib.contextmanager
def records(name: str):
    """Every record logged through logger ``name`` (torch's loggers do not propagate to
    the root logger, so pytest's caplog never sees them)."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = got.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield got
    finally:
        logger.removeHandler(handler)


def test_a_failed_dynamic_trial_export_logs_no_error():
    """torch logs the failing fake kernel at error level; a compile that succeeds must
    not leave error records behind (issue 17, item 3)."""
    torch.manual_seed(0)
    models = [BatchBakedIntoView().eval() for _ in range(2)]
    args = [(torch.randn(1, 32, 256),), (torch.randn(1, 32, 256),)]
    with records("torch._subclasses.fake_tensor") as got:  # it does not propagate
        fused = stfuse.compile(models, args)
    assert not [r.getMessage() for r in got if r.levelno >= logging.ERROR]
    assert not any(s.dynamic for s in fused.specs.values())  # the static export was kept
    check_tenants(fused, models, args)


class BatchBakedIntoBuffer(torch.nn.Module):
    """Holds only at its traced batch (a [2, 8] buffer added to [B, 8]): the annotate
    pass's fake-tensor probe at batch 3 fails on it, as expected."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("z", torch.randn(2, 8))

    def forward(self, x):
        return self.lin(x) + self.z


def test_expected_fake_tensor_failures_in_annotate_log_no_error():
    torch.manual_seed(0)
    models = [BatchBakedIntoBuffer().eval() for _ in range(2)]
    args = [(torch.randn(2, 8),), (torch.randn(2, 8),)]
    with records("torch._subclasses.fake_tensor") as got:
        fused = stfuse.compile(models, args)
    assert not [r.getMessage() for r in got if r.levelno >= logging.ERROR]
    check_tenants(fused, models, args)


def test_the_filter_is_per_thread_and_ends_with_the_trial():
    import threading

    from stfuse.frontend import _TRIALS

    log = logging.getLogger(_TRIALS.LOGGER)
    with records(_TRIALS.LOGGER) as got:
        with _TRIALS.quiet():
            log.error("inside the trial")
            other = threading.Thread(target=log.error, args=("another thread",))
            other.start()
            other.join()
        log.error("after the trial")
    assert [r.getMessage() for r in got] == ["another thread", "after the trial"]


def test_a_decoder_returning_its_kv_cache_is_refused_with_what_to_do():
    T = pytest.importorskip("transformers")
    cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    assert cfg.use_cache  # transformers' default
    torch.manual_seed(0)
    model = T.LlamaModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(stfuse.TraceError, match=r"use_cache=True\): set model.config.use_cache = False"):
        stfuse.compile([model], [{"input_ids": ids}])
    keyword = stfuse.compile([model], [{"input_ids": ids, "use_cache": False}])  # what the message says
    (by_keyword,) = keyword({"input_ids": ids, "use_cache": False})
    model.config.use_cache = False  # the message's other way
    fused = stfuse.compile([model], [{"input_ids": ids}])
    (out,) = fused({"input_ids": ids})
    assert_close(by_keyword.last_hidden_state, out.last_hidden_state)
    assert_close(out.last_hidden_state, float64_call_reference(model, {"input_ids": ids}).last_hidden_state)
    assert out.past_key_values is None


class _Flagged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, relu=False, scale=1.0):
        y = self.lin(x) * scale
        return y.relu() if relu else y


def test_a_positional_constant_is_refused_with_the_keyword_call_to_use():
    torch.manual_seed(0)
    models, x = [_Flagged().eval(), _Flagged().eval()], torch.randn(2, 4)
    with pytest.raises(stfuse.TraceError, match=re.escape(
            "positional input 1 (True) is a bool; only tensor inputs are supported; pass relu=True by "
            "keyword instead, where it is a constant of the program: ((x,), {'relu': True})")):
        stfuse.compile(models, [(x, True)] * 2)
    with pytest.raises(stfuse.TraceError, match=re.escape(
            "pass relu=False, scale=2.0 by keyword instead, where they are constants of the program: "
            "((x,), {'relu': False, 'scale': 2.0})")):
        stfuse.compile(models, [((x, False, 2.0), {})] * 2)
    fused = stfuse.compile(models, [((x,), {"relu": True})] * 2)  # as the message says
    for out, m in zip(fused(((x,), {"relu": True}), ((x,), {"relu": True})), models):
        assert_close(out, m(x, True).detach())
