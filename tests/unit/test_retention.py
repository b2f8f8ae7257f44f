from elastune.checkpoint.retention import CheckpointInfo, RetentionPolicy, decide_retention


def infos(**extra):
    return [
        CheckpointInfo(step=s, metrics={"loss": {10: 3.0, 20: 1.0, 30: 2.0, 40: 2.5, 50: 2.6}[s]}, **extra.get(s, {}))
        for s in (10, 20, 30, 40, 50)
    ]


def test_keep_last():
    d = decide_retention(infos(), RetentionPolicy(keep_last=2))
    assert d.keep == (40, 50) and d.delete == (10, 20, 30)


def test_keep_best_by_metric_min_and_max():
    d = decide_retention(infos(), RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss"))
    assert d.keep == (20, 30, 50) and d.reasons[20] == "one of the best 2 by loss"
    d = decide_retention(infos(), RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss", best_mode="max"))
    assert d.keep == (10, 50)


def test_pinned_and_references_are_never_deleted():
    cps = [
        CheckpointInfo(10, pinned=True),
        CheckpointInfo(20),
        CheckpointInfo(30, references=frozenset({20})),  # a clone of 20
        CheckpointInfo(40),
        CheckpointInfo(50, references=frozenset({30})),  # a clone of a clone
    ]
    d = decide_retention(cps, RetentionPolicy(keep_last=1))
    assert d.keep == (10, 20, 30, 50) and d.delete == (40,)
    assert d.reasons[30] == "referenced by step 50" and d.reasons[20] == "referenced by step 30"


def test_metric_missing_is_not_best_and_keep_last_zero_keeps_only_policy_picks():
    cps = [CheckpointInfo(1), CheckpointInfo(2, metrics={"loss": 5.0})]
    d = decide_retention(cps, RetentionPolicy(keep_last=0, keep_best=5, best_metric="loss"))
    assert d.keep == (2,) and d.delete == (1,)
