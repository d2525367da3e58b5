"""A numpy re-computation of the network, layer by layer, to check Keras's numbers
(`cnnviz verify`)."""

from cnnviz.trust.reference.forward import (
    LayerTrace,
    VerifyReport,
    VerifyRow,
    reference_forward,
    verify,
)
from cnnviz.trust.reference.steps import explain_steps, format_table

__all__ = [
    "LayerTrace",
    "VerifyReport",
    "VerifyRow",
    "explain_steps",
    "format_table",
    "reference_forward",
    "verify",
]
