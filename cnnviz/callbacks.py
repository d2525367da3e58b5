"""Keras callbacks for your own `model.fit`: `ExplainCallback` (watch it learn, README).

Loaded on first use (PEP 562): `import cnnviz.callbacks` does not import Keras. The code lives in
`cnnviz.report.watch`, above the explain and trust floors it uses.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnnviz.report.watch import ExplainCallback

__all__ = ["ExplainCallback"]


def __getattr__(name: str):
    if name == "ExplainCallback":
        from cnnviz.report.watch import ExplainCallback

        return ExplainCallback
    raise AttributeError(f"module 'cnnviz.callbacks' has no attribute {name!r}")
