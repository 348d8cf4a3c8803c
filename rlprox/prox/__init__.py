"""The sparse-learning core: proximal operators, regularizers, ProxOptimizer, schedules.

Convention: prox_{t·R}(v) = argmin_x t·R(x) + ½‖x − v‖².
"""

from rlprox.prox.operators import (
    clip_outliers,
    project_abs_topk,
    project_topk,
    prox_elastic_net,
    prox_group_l2,
    prox_l0,
    prox_l1,
    prox_nuclear,
    prox_sef,
    prox_wgsef,
    sef,
    wgsef,
)
from rlprox.prox.optim import ProxOptimizer
from rlprox.prox.regularizers import (
    REGULARIZERS,
    Regularizer,
    build_regularizer,
    register_regularizer,
)
from rlprox.prox.schedules import (
    SCHEDULES,
    build_schedule,
    constant,
    cosine,
    linear,
    piecewise_sine,
)

__all__ = [
    "prox_l1",
    "prox_group_l2",
    "prox_l0",
    "project_topk",
    "project_abs_topk",
    "prox_elastic_net",
    "prox_nuclear",
    "sef",
    "prox_sef",
    "wgsef",
    "prox_wgsef",
    "clip_outliers",
    "Regularizer",
    "REGULARIZERS",
    "register_regularizer",
    "build_regularizer",
    "ProxOptimizer",
    "constant",
    "linear",
    "cosine",
    "piecewise_sine",
    "SCHEDULES",
    "build_schedule",
]
