"""A campaign's per-record statistics fitted once, then every calibrated statistic scored from them.

`fit_campaign(scores, masks, patient_ids)` keeps the arrays and computes, each the first time it
is needed and then reused:

  * `record_summary` — `calibration.record_summaries` (view-mean score standardised over models),
    behind the rank risk of records and patients and their noise floors;
  * `record_ranks` / `patient_ranks` — `calibration.unit_ranks` of the record and patient
    summaries: the one sort behind both the risk tables and their noise floors;
  * `lira_fit` / `rmia_fit` — `shadows.fit_shadows` (the per-record sorts of all models: medians
    for LiRA; trimmed means of `rmia_transform(scores)` for RMIA), behind every per-target attack.

So the expensive passes over the (n_models, n_records, n_views) array happen once however many
statistics, targets and variants are asked for. With `cache` (the audit passes its score cache's
`derived`), the record summary and both fits are stored as arrays next to the scores and read back
by later audits of the same runs instead of being recomputed. The methods call the same functions, with the same
defaults and seeds, as the audit's steps (`audit.record_risk_tables`, `attack_suite`, `noise_floors`).

`scores` are LiRA scores (`scores.lira_scores`: log-odds of the correct label); RMIA reads
probabilities through `rmia_transform` (default `scores.rmia_from_lira`, exact inverse).
"""

import dataclasses
import functools
import typing

import numpy as np
import pandas as pd

from medleak.errors import MedleakError
from medleak.privacy_utils.attacks import VARIANTS, attack_targets, check_targets
from medleak.privacy_utils.calibration import (DEFAULT_ALPHA, DEFAULT_AUC_THRESHOLD, UnitRanks, patient_codes,
                                               patient_mask_from_records, patient_rank_risk, patient_summaries,
                                               record_rank_risk, record_summaries, unit_ranks)
from medleak.privacy_utils.noise_floor import DEFAULT_PERMUTATIONS, DEFAULT_SEED, share_floor, strongest_attack_floor
from medleak.privacy_utils.risk import (RISK_THRESHOLDS, check_scores_masks, map_chunks, record_auc_from_moments,
                                        require_in_and_out)
from medleak.privacy_utils.rmia import DEFAULT_GAMMA, DEFAULT_POPULATION
from medleak.privacy_utils.scores import log_p_from_lira, rmia_from_lira
from medleak.privacy_utils.shadows import fit_arrays, fit_from_arrays, fit_shadows

RMIA_TRIM = 0.1  # trimmed-mean fraction of RMIA's reference means: the audit's --rmia_trim default
LOSS_CHUNK = 4096  # records per block of the loss-threshold scores
LOSS_THRESHOLD = "loss_threshold"  # Yeom et al.: the target's own log-likelihood, no shadow models
ATTACK_VARIANTS = VARIANTS + (LOSS_THRESHOLD,)


def loss_threshold_scores(scores, target_indices):
    """The global loss-threshold attack: (n_targets, n_records) float64 mean over views of log p of
    the targets' own LiRA scores (higher = more likely a member); no shadows involved."""
    scores = np.asarray(scores)
    if scores.ndim == 2:
        scores = scores[:, :, None]
    targets = check_targets(target_indices, scores.shape[0])
    result = np.empty((len(targets), scores.shape[1]))

    def work(a, b):  # record blocks on threads (numpy releases the GIL), no (targets × records × views) copy
        for row, t in enumerate(targets.tolist()):
            result[row, a:b] = log_p_from_lira(scores[t, a:b]).mean(axis=1)

    map_chunks(work, scores.shape[1], chunk=LOSS_CHUNK)
    return result


def campaign_noise_floors(record_summary, patient_summary, patient_mask, record_patient, *, attack_scores=None,
                          target_masks=None, alpha=DEFAULT_ALPHA, auc_threshold=DEFAULT_AUC_THRESHOLD,
                          thresholds=RISK_THRESHOLDS, n_permutations=DEFAULT_PERMUTATIONS, record_permutations=None,
                          seed=DEFAULT_SEED, on_permutation=None, record_ranks: UnitRanks | None = None,
                          patient_ranks: UnitRanks | None = None):
    """The campaign's noise floor: `noise_floor.share_floor` of patients (seed) and of records
    (seed + 1, `record_permutations` permutations, default n_permutations), and with attacks
    `strongest_attack_floor` (seed + 2) — the audit's seeds.

    record_summary (n_models, n_records), patient_summary (n_models, n_patients) float;
    patient_mask (n_models, n_patients) bool; record_patient (n_records,) int index of each record's
    patient; attack_scores {name: (n_targets, n_records)} with target_masks (n_targets, n_records);
    record_ranks / patient_ranks: their `calibration.unit_ranks` when already computed.
    `on_permutation()` is called once per permutation of each floor (a progress bar).
    Returns {"patients": …, "records": …[, "strongest_attack": …]} (share_above keyed by float threshold).
    """
    common = dict(thresholds=thresholds, alpha=alpha, auc_threshold=auc_threshold, on_permutation=on_permutation)
    record_permutations = n_permutations if record_permutations is None else record_permutations
    floors = {
        "patients": share_floor(patient_summary, patient_mask, seed=seed, n_permutations=n_permutations,
                                ranks=patient_ranks, **common),
        "records": share_floor(record_summary, patient_mask, record_patient, seed=seed + 1,
                               n_permutations=record_permutations, ranks=record_ranks, **common),
    }
    if attack_scores:
        if target_masks is None:
            raise MedleakError("the strongest-attack noise floor needs the targets' masks with the attack scores")
        floors["strongest_attack"] = strongest_attack_floor(attack_scores, target_masks, np.asarray(record_patient),
                                                            n_permutations=n_permutations, seed=seed + 2,
                                                            on_permutation=on_permutation)
    return floors


@dataclasses.dataclass(eq=False)  # arrays: no element-wise ==, no repr of 10⁸ numbers
class FittedCampaign:
    """Scores and masks of a campaign with its per-record fits, made once (`fit_campaign`); the fits
    stay in memory (a few hundred MB at 200 × 100,000 × 16) for later calls."""

    scores: np.ndarray = dataclasses.field(repr=False)  # (n_models, n_records, n_views) LiRA scores, not copied
    masks: np.ndarray = dataclasses.field(repr=False)  # (n_models, n_records) bool
    patient_ids: np.ndarray = dataclasses.field(repr=False)  # (n_records,)
    rmia_trim: float = RMIA_TRIM
    rmia_transform: typing.Callable | None = rmia_from_lira
    # (name, compute) → {array name: array}: compute() once per set of scores, stored (`cache.ScoreCache.derived`)
    cache: typing.Callable | None = dataclasses.field(default=None, repr=False)

    @property
    def n_models(self) -> int:
        return self.masks.shape[0]

    def _arrays(self, name, compute):
        return compute() if self.cache is None else self.cache(name, compute)

    @functools.cached_property
    def record_summary(self) -> np.ndarray:
        """(n_models, n_records) float32 `calibration.record_summaries`."""
        return self._arrays("record_summary", lambda: {"summary": record_summaries(self.scores)})["summary"]

    @functools.cached_property
    def record_ranks(self) -> UnitRanks:
        """`calibration.unit_ranks` of `record_summary`."""
        return UnitRanks(**self._arrays("record_ranks", lambda: unit_ranks(self.record_summary).arrays()))

    @functools.cached_property
    def patient_ranks(self) -> UnitRanks:
        """`calibration.unit_ranks` of `patient_summary`."""
        return UnitRanks(**self._arrays("patient_ranks", lambda: unit_ranks(self.patient_summary).arrays()))

    @functools.cached_property
    def lira_fit(self):
        """`shadows.fit_shadows` with medians (LiRA variants)."""
        arrays = self._arrays("lira_fit", lambda: fit_arrays(fit_shadows(self.scores, self.masks)))
        return fit_from_arrays(self.scores, self.masks, arrays)

    @functools.cached_property
    def rmia_fit(self):
        """`shadows.fit_shadows` of rmia_transform(scores) with trimmed means (RMIA variants)."""
        options = dict(medians=False, trim=self.rmia_trim or None, transform=self.rmia_transform)
        name = f"rmia_fit-{getattr(self.rmia_transform, '__name__', 'none')}-trim{self.rmia_trim:g}"
        arrays = self._arrays(name, lambda: fit_arrays(fit_shadows(self.scores, self.masks, **options)))
        return fit_from_arrays(self.scores, self.masks, arrays, **options)

    @functools.cached_property
    def patients(self):
        """(patient ids in order of first appearance, record → patient index, (n_models, n_patients) mask)."""
        ids, codes = patient_codes(self.patient_ids)
        return ids, codes, patient_mask_from_records(self.masks, codes, len(ids))

    @functools.cached_property
    def patient_summary(self) -> np.ndarray:
        """(n_models, n_patients) float32 `calibration.patient_summaries`, patients in `patients` order."""
        ids, codes, _ = self.patients
        return patient_summaries(self.record_summary, codes, len(ids))

    def record_risk(self, *, alpha=DEFAULT_ALPHA, auc_threshold=DEFAULT_AUC_THRESHOLD) -> pd.DataFrame:
        """`calibration.record_rank_risk`: auc, auc_se, null_sd, p_value, q_value, at_risk, n_in, n_out."""
        return record_rank_risk(None, self.masks, record_summary=self.record_summary, alpha=alpha,
                                auc_threshold=auc_threshold, ranks=self.record_ranks)

    def patient_risk(self, *, alpha=DEFAULT_ALPHA, auc_threshold=DEFAULT_AUC_THRESHOLD) -> pd.DataFrame:
        """`calibration.patient_rank_risk` (patients in order of first appearance, not sorted)."""
        return patient_rank_risk(None, self.masks, self.patient_ids, record_summary=self.record_summary,
                                 patient_summary=self.patient_summary, alpha=alpha, auc_threshold=auc_threshold,
                                 ranks=self.patient_ranks)

    def record_auc_gaussian(self):
        """The paper's Gaussian record AUC and its SE (`risk.record_auc`: biased above 0.5 under the
        null), from the LiRA fit's IN/OUT moments over all models (no further pass over the scores)."""
        fit = self.lira_fit
        moments = {"n_in": fit.n_in, "n_out": fit.n_out}
        for group in ("in", "out"):  # the fit's own moments: the numbers `risk.in_out_moments` gives
            moments[f"mean_{group}"] = fit.groups[group]["mean"]
            moments[f"sd_{group}"] = fit.groups[group]["sd"]
        return record_auc_from_moments(moments)

    def attack(self, target_indices, variants=ATTACK_VARIANTS, *, drop_seed=0, gamma=DEFAULT_GAMMA,
               n_population=DEFAULT_POPULATION, population_seed=0, a=None):
        """`attacks.attack_targets` on the fitted sorts: each target with its own leave-one-out shadows.

        variants: a name of ATTACK_VARIANTS (→ (n_targets, n_records) float64) or a sequence of them
        (→ {variant: array}); LOSS_THRESHOLD needs no shadows.
        """
        names = [variants] if isinstance(variants, str) else list(variants)
        unknown = [name for name in names if name not in ATTACK_VARIANTS]
        if unknown or not names:
            raise MedleakError(f"unknown attack variant(s) {unknown or names}; choose from {', '.join(ATTACK_VARIANTS)}")
        targets = check_targets(target_indices, self.n_models)
        shadow_names = [name for name in names if name != LOSS_THRESHOLD]
        result = {}
        if shadow_names:
            lira_fit = self.lira_fit if any(name.startswith("lira") for name in shadow_names) else None
            rmia_fit = self.rmia_fit if any(name.startswith("rmia") for name in shadow_names) else None
            result = attack_targets(self.scores, self.masks, targets, variant=shadow_names, drop_seed=drop_seed,
                                    gamma=gamma, n_population=n_population, population_seed=population_seed, a=a,
                                    lira_fit=lira_fit, rmia_fit=rmia_fit)
        if LOSS_THRESHOLD in names:
            result[LOSS_THRESHOLD] = loss_threshold_scores(self.scores, targets)
        result = {name: result[name] for name in names}
        return result[variants] if isinstance(variants, str) else result

    def noise_floor(self, attack_scores=None, target_indices=None, *, alpha=DEFAULT_ALPHA,
                    auc_threshold=DEFAULT_AUC_THRESHOLD, thresholds=RISK_THRESHOLDS,
                    n_permutations=DEFAULT_PERMUTATIONS, record_permutations=None, seed=DEFAULT_SEED) -> dict:
        """`campaign_noise_floors` of this campaign: patients' and records' shares and at_risk share
        against chance, and with `attack_scores` (an `attack` dict on `target_indices`) the chance
        level of the strongest attack. `record_permutations`: the records' count (default n_permutations)."""
        ids, codes, patient_mask = self.patients
        target_masks = None
        if attack_scores:
            if target_indices is None:
                raise MedleakError("noise_floor(attack_scores, target_indices): pass the targets the attacks scored")
            target_masks = self.masks[check_targets(target_indices, self.n_models)]
        return campaign_noise_floors(self.record_summary, self.patient_summary, patient_mask, codes,
                                     attack_scores=attack_scores, target_masks=target_masks, alpha=alpha,
                                     auc_threshold=auc_threshold, thresholds=thresholds,
                                     n_permutations=n_permutations, record_permutations=record_permutations, seed=seed,
                                     record_ranks=self.record_ranks, patient_ranks=self.patient_ranks)


def fit_campaign(scores, masks, patient_ids=None, *, rmia_trim=RMIA_TRIM, rmia_transform=rmia_from_lira,
                 cache=None) -> FittedCampaign:
    """A `FittedCampaign` of LiRA `scores` (n_models, n_records, n_views) (2-D = one view) and bool
    `masks` (n_models, n_records) over all the campaign's models; `patient_ids` (n_records,)
    (default: every record its own patient; a patient's records must be IN and OUT together).

    Checks shapes and that every record has at least one IN and one OUT model (one-line
    MedleakError otherwise); the fits themselves are made when first needed. `cache`: see
    `FittedCampaign.cache` (the audit's score cache; None: nothing stored).
    """
    scores, masks = check_scores_masks(scores, masks)
    n_in = masks.sum(axis=0)
    require_in_and_out(n_in, masks.shape[0] - n_in, what=f"{masks.shape[0]} models")
    if not 0.0 <= rmia_trim < 0.5:
        raise MedleakError(f"rmia_trim must lie in [0, 0.5), got {rmia_trim}")
    n_records = masks.shape[1]
    patient_ids = np.arange(n_records) if patient_ids is None else np.asarray(patient_ids)
    if patient_ids.shape != (n_records,):
        raise MedleakError(f"patient_ids has shape {patient_ids.shape}; it needs one id per record ({n_records},)")
    fitted = FittedCampaign(scores, masks, patient_ids, rmia_trim, rmia_transform, cache)
    fitted.patients  # a patient whose records disagree on IN/OUT: say so now, not at the first patient statistic
    return fitted
