"""Statistics and claim verdicts for baseline-vs-variant reports: pure functions of the results,
so they are tested on fabricated numbers."""
from __future__ import annotations

import math
import statistics

SUPPORTED, NOT_SUPPORTED, NOT_MEASURABLE = "supported", "not supported", "not measurable at this scale"

# Thresholds the verdicts use, written into every report.
O_N_LOG_N_MAX_EXPONENT = 1.3      # a fitted time ~ N^e with e <= 1.3 over 4k-16k: N log N-like
COMPUTE_REDUCTION_CLAIM = 0.40    # "~40-60% reduction": at least 40% less
RETRIEVAL_GAIN_CLAIM = 0.25       # "~25-40% improvement": at least 25% relative
RETRIEVAL_FLOOR = 0.05            # below this accuracy in both arms there is nothing to compare
ALPHA = 0.05


def summarize(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    if not values:
        raise ValueError("no values to summarize")
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
            "values": list(values)}


def welch(variant: list[float], baseline: list[float]) -> dict:
    """Welch's t-test (unequal variances), two-sided. p is None with fewer than 2 values per arm
    or no variance at all."""
    from scipy.stats import ttest_ind

    if len(variant) < 2 or len(baseline) < 2:
        return {"t": None, "p": None}
    result = ttest_ind(variant, baseline, equal_var=False)
    t, p = float(result.statistic), float(result.pvalue)
    return {"t": None if math.isnan(t) else t, "p": None if math.isnan(p) else p}


def claim_verdicts(results: dict) -> list[dict]:
    """The FIM design document's claims against the measured evidence of one variant arm
    (``results["claims_arm"]``) and the baseline."""
    base = results["arms"][results["baseline"]]
    arm = results["arms"][results["claims_arm"]]
    claims = []

    scaling = results.get("attention", {}).get("methods", {})
    fim_exp = scaling.get("fim", {}).get("exponent")
    dense_exp = scaling.get("dense", {}).get("exponent")
    if fim_exp is None:
        claims.append(_claim("O(N log N) attention", "no attention scaling measurement",
                             NOT_MEASURABLE, "bench attention did not run"))
    else:
        ok = fim_exp <= O_N_LOG_N_MAX_EXPONENT
        claims.append(_claim(
            "O(N log N) attention",
            f"fitted time exponent {fim_exp:.2f} for FIM vs {dense_exp:.2f} for dense causal SDPA"
            if dense_exp is not None else f"fitted time exponent {fim_exp:.2f} for FIM",
            SUPPORTED if ok else NOT_SUPPORTED,
            f"threshold: exponent <= {O_N_LOG_N_MAX_EXPONENT} over N in {results['attention']['fit_range']}"))

    time_ratio = arm["seconds_per_token"]["mean"] / base["seconds_per_token"]["mean"]
    flop_ratio = arm["flops_per_token"] / base["flops_per_token"]
    reduction = 1 - time_ratio
    claims.append(_claim(
        "40-60% compute reduction",
        f"wall time per token {time_ratio:.2f}x the baseline's ({time_ratio - 1:+.0%}); "
        f"model FLOPs per token {flop_ratio:.2f}x",
        SUPPORTED if reduction >= COMPUTE_REDUCTION_CLAIM else NOT_SUPPORTED,
        f"threshold: at least {COMPUTE_REDUCTION_CLAIM:.0%} less wall time per token at equal tokens"))

    for task in ("passkey", "mqar"):
        b, v = base["tasks"][task]["accuracy"]["mean"], arm["tasks"][task]["accuracy"]["mean"]
        name = f"25-40% better retrieval ({task})"
        evidence = f"accuracy {v:.2f} vs baseline {b:.2f}"
        if max(b, v) < RETRIEVAL_FLOOR:
            claims.append(_claim(name, evidence, NOT_MEASURABLE,
                                 f"both arms below {RETRIEVAL_FLOOR:.0%} accuracy: the models are too "
                                 "small or too briefly trained to retrieve at all"))
            continue
        gain = (v - b) / b if b > 0 else math.inf
        claims.append(_claim(name, f"{evidence} ({gain:+.0%} relative)" if b > 0 else evidence,
                             SUPPORTED if gain >= RETRIEVAL_GAIN_CLAIM else NOT_SUPPORTED,
                             f"threshold: at least {RETRIEVAL_GAIN_CLAIM:.0%} relative gain"))

    claims.append(_claim("interpretability", "attention mass per branch and level, routed blocks "
                         "(inspect-attention plot in this report)", NOT_MEASURABLE,
                         "no agreed quantitative measure; the plot is evidence to look at, not a score"))
    return claims


def _claim(claim: str, evidence: str, verdict: str, reason: str) -> dict:
    return {"claim": claim, "evidence": evidence, "verdict": verdict, "reason": reason}
