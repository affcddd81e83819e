import math

from megarl.trainer.metrics import MetricsLogger, PhaseTimer, read_tensorboard_scalars, summarize


def test_summarize_uses_population_std():
    out = summarize("critic/score", [0.0, 1.0, 1.0, 0.0])
    assert out == {"critic/score/mean": 0.5, "critic/score/std": 0.5, "critic/score/max": 1.0, "critic/score/min": 0.0}


def test_phase_timer_accumulates_and_totals():
    timer = PhaseTimer()
    with timer.phase("a"):
        pass
    with timer.phase("a"):
        pass
    with timer.phase("b"):
        pass
    m = timer.metrics()
    assert set(m) == {"timing_s/a", "timing_s/b", "timing_s/step"}
    assert math.isclose(m["timing_s/step"], m["timing_s/a"] + m["timing_s/b"])


def test_tensorboard_scalars_read_back_exactly(tmp_path):
    logger = MetricsLogger(str(tmp_path), backends=("tensorboard",))
    logger.log(1, {"actor/pg_loss": 0.25, "skip": "text", "nan": float("nan")})
    logger.log(2, {"actor/pg_loss": -0.5})
    logger.close()
    assert read_tensorboard_scalars(str(tmp_path)) == {"actor/pg_loss": [(1, 0.25), (2, -0.5)]}
