"""Differentially private training (DP-SGD), jax-privacy 2.x style: separate, composable pieces.

sampling.py    Poisson sampling of records or patients into fixed-shape padded batches
clipping.py    per-unit (record or patient) gradient clipping and summation
noise.py       Gaussian noise sigma * clip_norm, averaged by the expected batch size
accounting.py  calibration of sigma and spent epsilon (dp-accounting PLD/RDP); attack bounds
auditing.py    empirical epsilon lower bound from one training run (Steinke, Nasr & Jagielski 2023)
estimator.py   the DP gradient estimator for the Trainer and the per-run DP set-up
See docs/DP.md.
"""

from medleak.dp.accounting import (auc_upper_bound, auc_upper_bound_for_training,
                               calibrate_noise_multiplier, default_delta, max_tpr,
                               privacy_profile, spent_epsilon)
from medleak.dp.auditing import empirical_epsilon_lower_bound, one_run_audit, one_run_audit_models
from medleak.dp.estimator import (DpGradientEstimator, DpPlan, dp_batch_shape, plan_dp_run,
                              refuse_batch_stats, validate_dp_config)
from medleak.dp.sampling import poisson_batches
