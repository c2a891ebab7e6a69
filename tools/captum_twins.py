"""Pytest plugin: replace every Captum influence class by its SAM twin at ``rho = 0``.

Loaded by ``tools/captum_conformance.py`` (``pytest -p captum_twins``) before any test
module is imported, so Captum's own tests construct our classes with their arguments
passed through untouched; only ``rho=0`` (and ``variant="plain"`` for the Hessian
family) is added, as a default the tests never override.
"""

from __future__ import annotations

import captum.influence as public
import captum.influence._core.arnoldi_influence_function as arnoldi_module
import captum.influence._core.influence_function as naive_module
import captum.influence._core.tracincp as tracincp_module
import captum.influence._core.tracincp_fast_rand_proj as fast_module

import captum_sam

TWINS = {
    "TracInCP": (captum_sam.SAMTracInCP, {}),
    "TracInCPFast": (getattr(captum_sam, "SAMTracInCPFast", None), {}),
    "TracInCPFastRandProj": (getattr(captum_sam, "SAMTracInCPFastRandProj", None), {}),
    "NaiveInfluenceFunction": (captum_sam.SAMInfluenceFunction, {"variant": "plain"}),
    "ArnoldiInfluenceFunction": (
        getattr(captum_sam, "SAMArnoldiInfluenceFunction", None),
        {"variant": "plain"},
    ),
}
MODULES = (public, tracincp_module, fast_module, naive_module, arnoldi_module)


def at_rho_zero(twin: type, defaults: dict) -> type:
    """A subclass of ``twin`` whose ``rho`` (and other SAM-only arguments) default to Captum's."""

    def __init__(self, *args, **kwargs):  # noqa: N807
        for key, value in {"rho": 0.0, **defaults}.items():
            kwargs.setdefault(key, value)
        twin.__init__(self, *args, **kwargs)

    return type(twin.__name__, (twin,), {"__init__": __init__, "__module__": twin.__module__})


REPLACED = {}
for captum_name, (twin, defaults) in TWINS.items():
    if twin is None:
        continue
    substitute = at_rho_zero(twin, defaults)
    REPLACED[captum_name] = substitute
    for module in MODULES:
        if hasattr(module, captum_name):
            setattr(module, captum_name, substitute)


def pytest_report_header(config):  # noqa: D103
    names = ", ".join(f"{k} -> {v.__name__}" for k, v in REPLACED.items())
    return f"captum_sam twins at rho=0: {names}"
