"""The training loops. `run(config)` is what `launch/train.py` calls."""


def run(cfg) -> list[dict]:
    from megarl.trainer.rl_trainer import RLTrainer

    trainer = RLTrainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
