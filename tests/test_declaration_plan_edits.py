"""The declaration check of a pre-registered comparison also shows when the rest of the plan changed after
runs had finished (a protocol edited after results were seen), without calling the declaration late."""

from __future__ import annotations

from spannorm.experiments.declaration import check_declared_first, start_record

PRE = {"a": "span_clean", "b": "pre", "depth": 48}


def test_a_plan_edited_after_runs_finished_is_named_beside_the_declaration():
    first = {**start_record(PRE, "plan text", None, finished_before=0), "time": 0.0}
    same = {**start_record(PRE, "plan text", None, finished_before=40), "time": 3600.0}
    check = check_declared_first([first, same], PRE)
    assert check.declared_first and "changed later" not in check.text
    edited = {**start_record(PRE, "plan text, steps raised", None, finished_before=90), "time": 7200.0}
    check = check_declared_first([first, same, edited], PRE)
    assert check.declared_first  # the declaration itself is unchanged
    assert check.text.endswith("; the plan's text changed later (first at the start of 1970-01-01 02:00 UTC, "
                               "90 run(s) finished then), its declaration did not")
