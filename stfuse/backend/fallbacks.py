"""What Dynamo does without asking the backend: past its recompile limit it runs calls
eagerly. A logging filter sees its warning and counts it on the graphs stfuse compiled."""

from __future__ import annotations

import logging

from .registry import graphs

log = logging.getLogger("stfuse.backend")


def frame_code() -> str | None:
    """The function Dynamo is compiling, as its own warnings name it: 'name' (file:line)."""
    try:
        from torch._guards import TracingContext

        code = TracingContext.try_get().traced_code[0]
        return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"
    except Exception:  # noqa: BLE001 - called outside Dynamo (tests, direct use)
        return None


class _DynamoFallbacks(logging.Filter):
    """Sees Dynamo's "hit config.recompile_limit" warning and, for a function compiled with
    stfuse, counts it on that function's graphs and warns once on the stfuse.backend logger.

    Dynamo guards parameter shapes, so models of one class but other sizes each get their
    own graph; past ``torch._dynamo.config.recompile_limit`` graphs of one function, Dynamo
    runs further calls that match none of them eagerly, without calling any backend: stfuse
    cannot count those calls, only that it happened.
    """

    def __init__(self):
        super().__init__()
        self.warned: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if str(record.msg).startswith("torch._dynamo hit config.") and len(record.args) >= 3:
                self._seen(str(record.args[0]), record.args[1], str(record.args[2]))
        except Exception:  # noqa: BLE001, S110 - never break Dynamo's logging
            pass
        return True

    def _seen(self, limit: str, value, code: str) -> None:
        mine = [cg for cg in graphs() if cg.code == code]
        if not mine:
            return
        for cg in mine:
            cg.stats["dynamo_fallbacks"] += 1
        if code not in self.warned:
            self.warned.add(code)
            log.warning("stfuse backend: torch._dynamo hit its %s (%s) for %s: calls that need another "
                        "graph (another model size or input shape) now run eagerly without stfuse. Dynamo "
                        "compiles one graph per parameter shape: set torch._dynamo.config."
                        "force_parameter_static_shapes and force_nn_module_property_static_shapes to "
                        "False to share one graph across sizes, or raise torch._dynamo.config.%s "
                        "(docs/backend.md)", limit, value, code, limit)


_FALLBACKS = _DynamoFallbacks()


def watch_dynamo() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _FALLBACKS not in logger.filters:
        logger.addFilter(_FALLBACKS)
