"""When the modules may take their eager-inference shortcuts."""

from __future__ import annotations

import torch


def eager_inference() -> bool:
    """True without autograd and outside ``torch.compile`` tracing: the modules may then reuse
    temporaries in place (``out=`` views, ``add_``) and memoise per-run values on the host.

    Autograd needs the out-of-place graph; ``torch.compile`` traces the out-of-place form into
    its own fused kernels, and host-side memo lookups or ``out=`` views would break its graph.
    """
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()
