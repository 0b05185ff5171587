"""Pure logic of a search: Hydra's sweep grammar as distributions, the corners checked before
submitting, and the successive-halving rule at a rung."""

import optuna
import pytest

from launcher.errors import ConfigError
from launcher.trial.space import as_overrides, corner_points, split_overrides
from launcher.trial.study import RungPruner, default_rungs, is_promoted, promotable


def test_hydra_sweep_grammar_becomes_distributions():
    fixed, dims = split_overrides(["recipe=tiny_sft", "optim.lr=tag(log,interval(1e-6,1e-4))",
                                   "trainer.global_batch_size=choice(64,128)", "seed=range(1,3)",
                                   "optim.weight_decay=0.0,0.1", "trainer.max_steps=tag(int,interval(10,20))"])
    assert fixed == ["recipe=tiny_sft"]
    by_key = {d.key: d.distribution() for d in dims}
    assert by_key["optim.lr"] == optuna.distributions.FloatDistribution(1e-6, 1e-4, log=True)
    assert by_key["trainer.global_batch_size"] == optuna.distributions.CategoricalDistribution((64, 128))
    assert by_key["seed"] == optuna.distributions.IntDistribution(1, 2)  # Hydra's range excludes its end
    assert by_key["optim.weight_decay"] == optuna.distributions.CategoricalDistribution((0.0, 0.1))
    assert by_key["trainer.max_steps"] == optuna.distributions.IntDistribution(10, 20)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=tag(log,interval(0,1e-4))", "optim.lr='tag(log,interval(0,1e-4))': a log-scale interval must be above 0"),
    ("optim.lr=interval(1e-3,1e-4)", "the interval's start must be below its end"),
    ("optim.lr=tag(fast,interval(1e-4,1e-3))", "unknown tag 'fast'"),
    ("deepspeed=zero2,zero3", "a search covers plain config keys"),
    ("seed=1,1", "a choice lists a value twice"),
])
def test_a_bad_dimension_names_the_key_and_value(override, message):
    with pytest.raises(ConfigError) as error:
        split_overrides([override])
    assert message in str(error.value)


def test_corners_are_every_combination_of_choices_and_bounds_until_capped():
    _, dims = split_overrides(["optim.lr=interval(1e-4,1e-3)", "trainer.global_batch_size=8,16,32"])
    assert len(corner_points(dims)) == 6
    assert {"optim.lr": 1e-3, "trainer.global_batch_size": 32} in corner_points(dims)
    _, many = split_overrides([f"k{i}=1,2,3" for i in range(5)])  # 243 combinations: each value once instead
    assert len(corner_points(many)) == 1 + 5 * 2
    assert as_overrides({"optim.lr": 1e-4, "x": None, "y": True}) == ["optim.lr=0.0001", "x=null", "y=true"]


def test_successive_halving_keeps_the_best_fraction_seen_at_the_rung():
    assert not is_promoted(3.0, [3.0], 3, maximize=False)  # fewer than `reduction` values: nobody goes on yet
    assert not is_promoted(2.0, [2.0, 3.0], 3, maximize=False)
    assert is_promoted(2.0, [2.0, 3.0, 4.0], 3, maximize=False)
    assert not is_promoted(2.5, [1.0, 2.0, 2.5, 4.0, 5.0, 6.0], 3, maximize=False)  # the best 2 of 6 go on: 2.5 is third
    assert is_promoted(2.0, [1.0, 2.0, 2.5, 4.0, 5.0, 6.0], 3, maximize=False)
    assert is_promoted(0.9, [0.2, 0.9], 2, maximize=True)
    assert not is_promoted(float("nan"), [1.0, 2.0, 3.0], 3, maximize=False)
    assert default_rungs(72, 3) == [8, 24, 72]


def test_the_pruner_stops_a_trial_at_a_rung_unless_it_ranks_and_never_at_the_end():
    study = optuna.create_study(pruner=RungPruner([4, 12, 36], 3))
    verdicts = []
    for value in (3.0, 2.0, 4.0, 1.0):
        trial = study.ask()
        trial.report(value, 4)
        verdicts.append(trial.should_prune())
        trial.report(value, 5)  # not a rung
        assert not trial.should_prune()
        trial.report(value + 10, 36)  # the last rung is the end of training
        assert not trial.should_prune()
    assert verdicts == [True, True, True, False]  # 4.0 is not the best of 3; 1.0 is the best of 4
    assert not promotable(study, study.trials[1], 4, 3)  # 2.0 waits: only the best 4 // 3 = 1 goes on
    for value in (5.0, 6.0):  # two more reports: the best 6 // 3 = 2 go on, so 2.0 is promoted now
        study.ask().report(value, 4)
    assert promotable(study, study.trials[1], 4, 3)
