"""Mean-field theory of signal propagation: variance maps, gradient gains, predictions for
a model's Linear -> [norm] -> activation chains (see :mod:`flowscope.theory.meanfield`);
depth scales, the correlation map and the edge of chaos (:mod:`flowscope.theory.depthscales`);
the spectrum of a model's input-output Jacobian (:mod:`flowscope.theory.spectrum`)."""

from flowscope.theory.chains import Link, mlp_chains, predict_chain
from flowscope.theory.depthscales import (
    correlation_map,
    depth_scales,
    edge_of_chaos,
    fixed_point,
)
from flowscope.theory.meanfield import (
    derivative_moment,
    expect,
    gradient_gain,
    predict_mlp,
    second_moment,
    sigma_w2_of,
    variance_map,
)
from flowscope.theory.measure import measure_mlp
from flowscope.theory.spectrum import isometry_moments, jacobian_moments, jacobian_spectrum

__all__ = [
    "Link",
    "correlation_map",
    "depth_scales",
    "derivative_moment",
    "edge_of_chaos",
    "expect",
    "fixed_point",
    "gradient_gain",
    "isometry_moments",
    "jacobian_moments",
    "jacobian_spectrum",
    "measure_mlp",
    "mlp_chains",
    "predict_chain",
    "predict_mlp",
    "second_moment",
    "sigma_w2_of",
    "variance_map",
]
