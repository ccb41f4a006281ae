"""Errors with the argument's name, through MXNet's ways of hiding them.

The MXNet operators (csrc/mxop) raise "ValueError: <message>", which MXNet's frontend turns into
a ValueError whose text repeats the kind; ``translate_errors`` strips it. The CustomOps are
worse off: MXNet swallows an exception raised in a CustomOpProp callback and raises a bare
MXNetError ("Check failed: ...") instead, so the ops record the real error on the thread
(``record_error``) and ``translate_errors`` re-raises it.
"""
import threading
from contextlib import contextmanager

import mxnet as mx

_last_error = threading.local()


def record_error(exc):
    """Remember a validation error raised inside a CustomOp callback on this thread."""
    _last_error.exc = exc
    return exc


def _strip_kind(err):
    """A ValueError/TypeError whose message starts with its own kind ("ValueError: ...", as
    MXNet formats an operator's error), as the same error without the prefix; else None."""
    text = str(err)
    for kind in (ValueError, TypeError):
        prefix = f"{kind.__name__}: "
        if isinstance(err, kind) and text.startswith(prefix):
            return kind(text[len(prefix):].split("\n", 1)[0])
    return None


@contextmanager
def translate_errors():
    """Re-raise the error a fused op's failure stands for, with its message."""
    _last_error.exc = None
    try:
        yield
    except (mx.base.MXNetError, ValueError, TypeError) as err:
        # Gluon's deferred init re-raises an MXNetError as a ValueError.
        hidden, _last_error.exc = getattr(_last_error, "exc", None), None
        if hidden is not None and hidden is not err:
            raise hidden from err
        clean = _strip_kind(err)
        if clean is not None:
            raise clean from None
        raise


__all__ = ["record_error", "translate_errors"]
