"""The public array API (`medleak.privacy_utils`): the audit's numbers, fitted once; chance on null data; bad input."""

import math

import numpy as np
import pytest

import medleak.privacy_utils as api
from medleak.campaign.plan import make_patient_mask
from medleak.errors import MedleakError
from medleak.privacy_utils import calibrated
from medleak.privacy_utils.audit import ATTACK_VARIANTS, AuditOptions, attack_suite, noise_floors, record_risk_tables
from medleak.privacy_utils.scoring import load_campaign
from tests.campaigns import write_planted_campaign

PERMUTATIONS = 40  # the noise floors are compared number for number, not judged: few permutations suffice
LOSS_NAME = "Loss threshold"  # the audit's display name of calibrated.LOSS_THRESHOLD


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    logdir = write_planted_campaign(tmp_path_factory.mktemp("api") / "logs", n_runs=16, n_patients=60)
    return load_campaign(logdir, progress=False)


def audit_variant(name):
    return calibrated.LOSS_THRESHOLD if name == LOSS_NAME else ATTACK_VARIANTS[name]


def test_public_path_gives_the_audits_numbers(campaign):
    options = AuditOptions(permutations=PERMUTATIONS, progress=False, seed=3)
    targets = np.arange(12, 16)
    risk = record_risk_tables(campaign, options)
    attacks = attack_suite(campaign, options, targets)
    floors = noise_floors(risk, attacks, options)

    fitted = api.fit_campaign(campaign.scores, campaign.masks, campaign.records["patient_id"])
    records = fitted.record_risk()
    for column in ("auc", "auc_se", "p_value", "q_value", "at_risk", "n_in", "n_out"):
        np.testing.assert_array_equal(records[column].to_numpy(), risk.record_table[column].to_numpy(), err_msg=column)
    gaussian_auc, gaussian_se = fitted.record_auc_gaussian()
    np.testing.assert_allclose(gaussian_auc, risk.record_table["auc_gaussian"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gaussian_se, risk.record_table["auc_gaussian_se"], rtol=1e-10, atol=1e-12)

    patients = fitted.patient_risk().set_index("patient_id")
    audit_patients = risk.patient_table.set_index("patient_id")
    assert set(patients.index) == set(audit_patients.index)
    patients = patients.loc[audit_patients.index]
    for column in ("auc", "auc_se", "p_value", "q_value", "at_risk", "n_records", "n_in", "n_out"):
        np.testing.assert_array_equal(patients[column].to_numpy(), audit_patients[column].to_numpy(), err_msg=column)
    assert patients["at_risk"].sum() > 0  # the planted patients: the comparison is not between all-zero columns

    scores = fitted.attack(targets, [audit_variant(name) for name in attacks.scores], drop_seed=options.seed,
                           gamma=options.rmia_gamma, n_population=options.rmia_population, population_seed=options.seed)
    for name, values in attacks.scores.items():
        np.testing.assert_array_equal(scores[audit_variant(name)], values, err_msg=name)

    by_audit_name = {name: scores[audit_variant(name)] for name in attacks.scores}
    public_floors = fitted.noise_floor(by_audit_name, targets, n_permutations=PERMUTATIONS,
                                       record_permutations=options.record_permutations, seed=options.seed)
    for unit in ("patients", "records"):  # the audit keys share_above by "0.6" for JSON
        public_floors[unit]["share_above"] = {f"{t:g}": v for t, v in public_floors[unit]["share_above"].items()}
    assert public_floors == floors
    assert floors["records"]["n_permutations"] == options.record_permutations != floors["patients"]["n_permutations"]


def test_fits_are_made_once_and_shared(campaign, monkeypatch):
    calls = []
    original = calibrated.fit_shadows
    monkeypatch.setattr(calibrated, "fit_shadows", lambda *a, **k: calls.append(k.get("trim")) or original(*a, **k))
    fitted = api.fit_campaign(campaign.scores, campaign.masks, campaign.records["patient_id"])
    assert calls == []  # nothing fitted before it is needed
    first = fitted.attack([0, 1], ["lira_online", "rmia_offline"])
    second = fitted.attack([5], "lira_offline_fixed")
    fitted.record_auc_gaussian()
    assert calls == [None, calibrated.RMIA_TRIM]  # one LiRA sort, one RMIA sort, for three calls
    np.testing.assert_array_equal(first["lira_online"],
                                  api.attack_targets(campaign.scores, campaign.masks, [0, 1], variant="lira_online"))
    assert second.shape == (1, campaign.scores.shape[1])


def test_loss_threshold_is_each_targets_own_mean_log_likelihood(campaign):
    targets = [2, 7]
    expected = np.empty((2, campaign.scores.shape[1]))
    for row, t in enumerate(targets):  # log p = log σ(lira score), view by view
        for r in range(campaign.scores.shape[1]):
            expected[row, r] = np.mean([math.log(1.0 / (1.0 + math.exp(-float(x)))) for x in campaign.scores[t, r]])
    got = api.fit_campaign(campaign.scores, campaign.masks).attack(targets, "loss_threshold")
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def null_arrays(n_models=32, n_patients=400, seed=0, n_views=2):
    """No membership signal: record difficulty, model and view noise only; 1–6 images per patient, exact-k plan."""
    rng = np.random.default_rng(seed)
    n_images = rng.integers(1, 7, size=n_patients)
    codes = np.repeat(np.arange(n_patients), n_images)
    masks = make_patient_mask(n_models, n_patients, 0.5, seed)[:, codes]
    scores = (rng.normal(0, 2, size=(1, codes.size, 1)) + rng.normal(0, 0.5, size=(n_models, 1, 1))
              + rng.normal(0, 1, size=(n_models, codes.size, n_views))).astype(np.float32)
    return scores, masks, np.array([f"q{c:04d}" for c in codes])


def clustered_se(values, clusters):
    """SE of the mean of `values` when they are independent between clusters only (a patient's
    records share their IN/OUT models, so their AUCs move together)."""
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    residual_sums = np.bincount(codes, weights=values - values.mean())
    return math.sqrt(np.sum(residual_sums**2)) / values.size


def test_null_data_is_at_chance_through_the_public_api():
    scores, masks, patient_ids = null_arrays()
    fitted = api.fit_campaign(scores, masks, patient_ids)
    patients = fitted.patient_risk()
    for table, clusters in ((fitted.record_risk(), patient_ids), (patients, patients["patient_id"])):
        auc = table["auc"].to_numpy()
        se = clustered_se(auc, clusters)
        assert abs(auc.mean() - 0.5) <= 2 * se, f"mean AUC {auc.mean():.4f} ± {se:.4f}"
        assert table["at_risk"].mean() <= 0.05
    # the paper's Gaussian record AUC on the same data: clipped at 0.5, so biased above it
    gaussian, _ = fitted.record_auc_gaussian()
    assert gaussian.mean() > 0.51
    targets = np.arange(8)
    attacks = fitted.attack(targets)
    assert set(attacks) == set(calibrated.ATTACK_VARIANTS)
    floor = fitted.noise_floor(attacks, targets, n_permutations=100)
    strongest = floor["strongest_attack"]["max_auc"]
    assert strongest["excess_lo"] <= 0.0 <= strongest["excess_hi"], strongest
    for unit in ("patients", "records"):
        assert floor[unit]["at_risk"]["observed"] <= 0.05
        for threshold, share in floor[unit]["share_above"].items():  # the eSF lies in its chance band
            assert share["excess_lo"] <= 0.0 <= share["excess_hi"], (unit, threshold, share)


def one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(MedleakError, match=match) as caught:
        fn(*args, **kwargs)
    assert "\n" not in str(caught.value)


def test_bad_input_gets_one_line_errors():
    scores, masks, patient_ids = null_arrays(n_models=8, n_patients=30)
    one_line_error(api.fit_campaign, scores, masks[:, :-1], match="masks must be")
    one_line_error(api.fit_campaign, scores, masks, patient_ids[:-1], match="patient_ids")
    always_in = masks.copy()
    always_in[:, 0] = True
    one_line_error(api.fit_campaign, scores, always_in, match="no OUT model")
    split = patient_ids.copy()
    split[:] = "one patient"
    one_line_error(api.fit_campaign, scores, masks, split, match="same patient")
    one_line_error(api.fit_campaign, scores, masks, rmia_trim=0.7, match="rmia_trim")
    fitted = api.fit_campaign(scores, masks, patient_ids)
    one_line_error(fitted.attack, [0], "lira_sideways", match="unknown attack variant")
    one_line_error(fitted.attack, [8], match="target_indices")
    one_line_error(fitted.noise_floor, {"lira_online": np.zeros((1, masks.shape[1]))}, match="pass the targets")
    bad = scores.copy()
    bad[0, 0, 0] = np.nan
    one_line_error(api.fit_campaign(bad, masks).record_risk, match="NaN or inf")


def test_float32_target_statistics_give_the_float64_aucs(campaign, monkeypatch):
    from medleak.privacy_utils import attacks
    from medleak.privacy_utils.roc import summarise_attack

    targets = np.arange(10, 16)
    members = campaign.masks[targets]

    def scored():
        return api.fit_campaign(campaign.scores, campaign.masks, campaign.records["patient_id"]).attack(targets)

    assert attacks.STATS_DTYPE == np.float32
    float32 = scored()
    monkeypatch.setattr(attacks, "MAX_TARGETS_IN_FLIGHT", 1)  # one target at a time: the same numbers
    for name, values in scored().items():
        np.testing.assert_array_equal(values, float32[name], err_msg=name)
    monkeypatch.setattr(attacks, "STATS_DTYPE", np.float64)
    float64 = scored()
    for name in float32:
        fast, exact = summarise_attack(float32[name], members)[0], summarise_attack(float64[name], members)[0]
        np.testing.assert_allclose(fast["auc"]["per_target"], exact["auc"]["per_target"], rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(float32[name], float64[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert summarise_attack(float64["lira_online"], members)[0]["auc"]["mean"] > 0.55  # planted: not a comparison at chance
