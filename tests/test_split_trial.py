"""split_trial's choice among timed plans."""

from iso_kernels.split_trial import TRIAL_MARGIN, _pick


def test_a_plan_replaces_the_default_only_where_it_wins_round_for_round():
    even = [1.00, 1.20, 0.90]  # the machine's load drifts from round to round; interleaved plans share it
    clearly = [t * (1 - 2 * TRIAL_MARGIN) for t in even]
    barely = [t * (1 - TRIAL_MARGIN / 2) for t in even]
    assert _pick([even, clearly], default=0) == 1
    assert _pick([even, barely], default=0) == 0
    lucky = [0.80, 1.30, 0.95]  # the fastest median (0.95 < 1.00), but slower in two of the three rounds
    assert _pick([even, lucky], default=0) == 0
    assert _pick([clearly, even], default=1) == 0  # the default need not come first
