"""benchmarks.train_step_vs_official's table: the official-as-released column (bf16 rows only),
the headline ratio at the suite's precision map, the target line and the index-change note."""
from benchmarks.train_step_vs_official import to_markdown


def _side(s):
    return {"min_s": s, "median_s": s * 1.02, "loss": 18.8, "grad_norm": 3.0}


def _row(precision, official, suite, released=None):
    r = {"size": "large", "batch": "gen", "gen_rows": 4, "precision": precision, "official": _side(official),
         "suite": _side(suite), "suite_pretok": _side(suite * 0.8), "ratio_min": round(official / suite, 3),
         "ratio_median": round(official / suite, 3), "ratio_pretok_min": round(official / suite / 0.8, 3),
         "loss_abs_diff": 1e-6, "grad_norm_rel_diff": 0.0, "loss_equal": True if precision == "fp32" else None}
    if released is not None:
        r.update(official_released=_side(released), ratio_released_min=round(released / suite, 3),
                 target_indices_changed_by_bf16_encode=0.02)
    return r


META = {"official": {"commit": "453d3cf8", "transformers": "4.46.1"}, "transformers": "5.24.0", "cpu_model": "CPU X",
        "torch": "2.14.1", "rounds": 4, "k": 3, "loadavg_start": [0.1], "loadavg_end": [1.0], "commit": "abcdef1234",
        "dirty": "false", "size_notes": {"large": "108M"}}


def test_released_column_and_target():
    md = to_markdown(META, [_row("fp32", 2.4, 1.7), _row("bf16", 1.5, 1.2, released=1.4)])
    lines = [ln for ln in md.splitlines() if ln.startswith("| large")]
    assert lines[0].split("|")[9].strip() == "-"  # fp32: no released column
    assert "1.400 (1.17x)" in lines[1] and "**1.25x**" in lines[1]
    assert "**NOT met** (lowest ratio fp32 1.412, bf16 1.25)" in md
    assert "moves 2.0% to 2.0% of the batches' target indices" in md
    md = to_markdown(META, [_row("fp32", 2.7, 1.7), _row("bf16", 1.9, 1.2, released=1.8)])
    assert "**met**" in md
