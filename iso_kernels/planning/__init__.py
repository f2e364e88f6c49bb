"""Whether and where to split a prompt into ISO chunks: the cost model, its simulation, the solver, the one
policy, calibration and the measured trial. Numpy only: ``import iso_kernels.planning`` loads no torch.

    shapes       ModelShape (a model's sizes), PrefillShape (what one prefill hands to planning), checks
    costs        LayerCosts: per-op times, from a datasheet (``hardware``) or a fit
    simulation   the two-stream event simulation: simulate_prefill, total_times, predict
    solver       best_split, balanced_split, ranked_splits: where to cut, for the fastest simulated prefill
    policy       every threshold, and decide(): whether and where to split; plan(), its Python entry
    calibration  fit_layer_costs and its cache file; PlanCorrection from timed prefills
    trial        split_trial: time the policy's plan against its alternatives on the job's ranks

docs/architecture.md shows where each sits in a prefill; docs/cost-model.md derives the model.
"""

from .calibration import PlanCorrection, fit_layer_costs, fit_plan_correction, load_calibration, save_calibration
from .costs import LayerCosts
from .policy import OFF_RULES, Plan, Policy, decide, plan
from .shapes import ModelShape, PrefillShape, model_shape
from .simulation import Prediction, PrefillSim, predict, simulate_prefill
from .solver import balanced_split, best_split, ranked_splits
from .trial import SplitChoice, TrialCandidate, split_trial, timed_rounds

__all__ = ["OFF_RULES", "LayerCosts", "ModelShape", "Plan", "PlanCorrection", "Policy", "Prediction",
           "PrefillShape", "PrefillSim", "SplitChoice", "TrialCandidate", "balanced_split", "best_split", "decide",
           "fit_layer_costs", "fit_plan_correction", "load_calibration", "model_shape", "plan", "predict",
           "ranked_splits", "save_calibration", "simulate_prefill", "split_trial", "timed_rounds"]
