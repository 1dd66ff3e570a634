"""Choosing the product default on validation (benchmarks/_quality_lib.py `choose_default`, wired into
benchmarks/quality.py): float ties and gains within their std go to the simplest rule; shares of the oracle's gain
only where that gain exceeds its std."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _quality_lib as Q  # noqa: E402

ORDER = ["vanilla", "default", "cluster", "cluster_weighted"]


def test_a_float_tie_goes_to_the_simpler_rule():
    """The sweep that made the paper's rule the default by 1e-15 (issue #19), with and without a std."""
    for std in (0.0, 0.004):
        deltas = {"default": (0.024999999999999467, std), "cluster_weighted": (0.025000000000000799, std)}
        rule, reason = Q.choose_default(deltas, ORDER)
        assert rule == "default"
        assert "ties" in reason and "cluster_weighted" in reason
    # the simpler rule wins the tie whichever side the float noise falls on
    deltas = {"default": (0.025000000000000799, 0.0), "cluster_weighted": (0.024999999999999467, 0.0)}
    assert Q.choose_default(deltas, ORDER)[0] == "default"


def test_a_gain_within_its_std_keeps_vanilla():
    deltas = {"default": (0.0, 0.0), "cluster": (0.4, 0.51), "cluster_weighted": (0.5, 0.5)}
    rule, reason = Q.choose_default(deltas, ORDER)
    assert rule == "vanilla"
    assert reason.startswith("no rule beats vanilla on validation by more than its paired std")
    assert "cluster_weighted +0.5 ± 0.5" in reason  # the best candidate is named


def test_a_clear_winner_wins():
    deltas = {"default": (0.02, 0.03), "cluster": (0.3, 0.2), "cluster_weighted": (2.1, 0.4)}
    rule, reason = Q.choose_default(deltas, ORDER)
    assert rule == "cluster_weighted"
    assert "cluster_weighted +2.1 ± 0.4 over vanilla on validation" in reason and "ties" not in reason


def test_among_winners_a_gap_within_either_std_is_a_tie_for_the_simpler_rule():
    deltas = {"default": (1.0, 0.1), "cluster": (1.3, 0.4), "cluster_weighted": (1.05, 0.01)}
    assert Q.choose_default(deltas, ORDER)[0] == "default"
    deltas["cluster"] = (1.6, 0.4)  # now higher by more than both stds
    assert Q.choose_default(deltas, ORDER)[0] == "cluster"


def test_negative_gains_never_win():
    deltas = {"default": (-0.1, 0.0), "cluster": (-1.44, 0.3), "cluster_weighted": (-0.43, 0.51)}
    rule, reason = Q.choose_default(deltas, ORDER)
    assert rule == "vanilla" and "best: default -0.1 ± 0" in reason
    # a positive gain with zero std is a winner; the same with a negative mean is not
    assert Q.choose_default({"cluster": (0.2, 0.0)}, ORDER)[0] == "cluster"
    assert Q.choose_default({"cluster": (-0.2, 0.0)}, ORDER)[0] == "vanilla"


def test_nan_and_missing_rules_and_bad_calls():
    assert Q.choose_default({"cluster": (math.nan, 0.1), "default": (1.0, math.nan)}, ORDER)[0] == "vanilla"
    assert Q.choose_default({}, ORDER) == ("vanilla", "no rule beats vanilla on validation by more than its paired std")
    with pytest.raises(ValueError, match="does not list"):
        Q.choose_default({"oracle": (3.0, 0.1)}, ORDER)
    with pytest.raises(ValueError, match="order"):
        Q.choose_default({}, [])


def test_oracle_share_only_where_the_oracle_gain_exceeds_its_std():
    assert Q.oracle_share(1.0, (2.0, 0.5)) == 0.5
    assert Q.oracle_share(-0.43, (0.07, 0.15)) is None  # the -650 % of issue #19
    assert Q.oracle_share(1.0, (0.5, 0.5)) is None  # equal to its std: not beyond the noise
    assert Q.oracle_share(1.0, (-2.0, 0.1)) is None
    assert Q.oracle_share(-1.0, (2.3, 1.0)) == pytest.approx(-1.0 / 2.3)


def _entry(validation_cat: tuple[float, float], validation_inst: tuple[float, float]) -> dict:
    return {"validation_delta": {"cat": validation_cat, "inst": validation_inst}, "delta": {"cat": (9.0, 0.1)}}


def test_quality_benchmark_chooses_per_regime_on_validation_among_label_free_rules():
    import quality

    assert quality.DEFAULT_CANDIDATES[0] == "vanilla" and "oracle" not in quality.DEFAULT_CANDIDATES
    summary = {
        "single": {"vanilla": _entry((0.0, 0.0), (0.0, 0.0)), "default": _entry((0.025000000000000799, 0.0), (0, 0)),
                   "cluster": _entry((0.024999999999999467, 0.0), (0, 0)), "oracle": _entry((5.0, 0.1), (5.0, 0.1))},
        "many": {"vanilla": _entry((0.0, 0.0), (0.0, 0.0)), "cluster_weighted": _entry((-0.43, 0.51), (2.0, 0.1)),
                 "oracle": _entry((0.07, 0.15), (0.0, 0.1))},
        "old": {"vanilla": {"delta": {"cat": (0.0, 0.0)}}},  # a report from before validation deltas were stored
    }
    choices = quality.choose_defaults(summary, has_category=True)
    assert choices["single"]["rule"] == "default"  # the float tie; the oracle (labels) is never a candidate
    assert choices["many"]["rule"] == "vanilla"
    assert "old" not in choices
    assert quality.choose_defaults(summary, has_category=False)["many"]["rule"] == "cluster_weighted"


def _run(regime: str, strategy: str, seed: int, validation: float, test: float) -> dict:
    metrics = lambda r1: {"t2i_R@1": r1, "t2i_R@5": r1, "t2i_R@10": r1, "t2i_median_rank": 1.0, "i2t_R@1": r1}  # noqa: E731
    return {"regime": regime, "strategy": strategy, "seed": seed, "steps": 10, "kind": "final", "pooling": "mean",
            "seconds": 1.0, "evals": {"validation": {"cat": metrics(validation), "inst": metrics(validation)},
                                      "test": {"cat": metrics(test), "inst": metrics(test)}}}


def _settings_report(partial_gain: float) -> dict:
    """Base `single` (InfoNCE, batch 256, frozen) and `single-partial`, vanilla and default per seed; the default rule
    ties vanilla, partial depth gains `partial_gain` on validation (noise ±0.5 by seed) and +3 on test."""
    import quality

    regimes = {name: {"loss": "infonce", "batch": 256, "depth": depth, "train_key": "train", "sampler": "random",
                      "share": None, "steps": 10} for name, depth in (("single", "frozen"), ("single-partial", "partial"))}
    runs = []
    for seed, noise in enumerate((-0.5, 0.0, 0.5)):
        for strategy in ("vanilla", "default"):
            runs.append(_run("single", strategy, seed, 50.0, 60.0))
            runs.append(_run("single-partial", strategy, seed, 50.0 + partial_gain + noise, 63.0))
    summary = quality.summarise(runs, list(regimes), ["vanilla", "default"], has_category=True)
    return {"settings": {"batch_size": 256}, "regimes": regimes, "summary": summary, "runs": runs}


def _chosen_settings(report: dict) -> dict:
    import quality

    choices = quality.choose_defaults(report["summary"], has_category=True)  # each setting's own rule, as in main
    return quality.choose_settings(report, choices, has_category=True)


def test_quality_benchmark_chooses_the_setting_on_validation_against_the_base_vanilla():
    chosen = _chosen_settings(_settings_report(partial_gain=2.0))["single"]
    assert (chosen["setting"], chosen["rule"]) == ("single-partial", "vanilla")  # the default rule tied vanilla
    assert chosen["test_delta"]["cat"] == pytest.approx((3.0, 0.0))
    assert chosen["ratio"] == pytest.approx(63.0 / 60.0)
    # a gain within its paired std keeps the base setting, and the ratio is then 1
    kept = _chosen_settings(_settings_report(partial_gain=0.3))["single"]
    assert kept["setting"] == "single" and kept["ratio"] == 1.0 and "no setting beats single" in kept["reason"]
