"""normlab: deep networks that stay healthy, and the tools that show what every layer does.

Two wings. The library, for any PyTorch model: layers (``normlab.nn``), initializers
(``normlab.init``, ``normlab.lsuv``), BatchNorm calibration and folding
(``normlab.calibrate``, ``normlab.fold``), per-layer diagnostics (``normlab.diagnostics``;
``normlab.audit(model, batch)`` for one judged step), the second-order instruments
(``normlab.curvature``, ``normlab.noise``, ``normlab.find_lr``) and the Lightning and transformers
callbacks (``normlab.integrations``). The trainer (``normlab.lm``): character-level
language models on the bundled names, built on the library, and the ``normlab`` command.
docs/ARCHITECTURE.md maps the modules.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # normlab.audit, find_lr and coord_check, loaded on first use: ``import normlab`` stays light
    if name == "audit":
        from normlab.auditor import audit

        return audit
    if name == "find_lr":
        from normlab.lr_find import find_lr

        return find_lr
    if name == "coord_check":
        from normlab.coordcheck import coord_check

        return coord_check
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
