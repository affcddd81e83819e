"""The RL loop (GRPO by default; PPO with a critic by `algorithm.name: ppo`), one step at a time:

    prompts → rollout (n per prompt) → rewards → old / reference log-probs (→ critic values)
            → advantages (→ critic updates) → ppo_epochs × mini-batch actor updates → weight push
            → metrics → checkpoint → validation

With a critic the actor is not updated during the first `trainer.critic_warmup` steps (the values
learn first); the weights pushed to the rollout engines then do not change either.

The driver (this process) holds data, rewards and the loop; the Megatron ranks are Ray actors
(`MegatronTrainWorker`, driven in lock step) and the rollout engines are vLLM Ray actors.
"""

from __future__ import annotations

import os
import time

import torch

from megarl.checkpoint.store import CRITIC_SUBDIR, read_trainer_state
from megarl.config.resolve import train_gpus
from megarl.config.schema import MegaRLConfig
from megarl.trainer import components
from megarl.trainer.metrics import PhaseTimer, summarize
from megarl.trainer.rollout_batch import build_rollout_batch, mini_batch_indices
from megarl.trainer.skeleton import TrainerSkeleton
from megarl.trainer.train_worker import MegatronTrainWorker, Model, needs_reference, uses_critic


class RLTrainer(TrainerSkeleton):
    trainer_state_keys = ("loader",)

    def __init__(self, cfg: MegaRLConfig):
        self.use_critic = uses_critic(cfg)
        super().__init__(cfg)  # store, resume resolution (a bad path fails before any actor starts), tokenizer
        train_set = components.prompt_dataset(cfg, self.tokenizer, cfg.data.train_files)
        self.loader = components.train_loader(cfg, train_set)
        self.data_metrics = {"data/train_prompts_dropped_overlong": train_set.num_filtered}
        self.val_set = (components.prompt_dataset(cfg, self.tokenizer, cfg.data.val_files) if cfg.data.val_files else None)
        if self.val_set is not None:
            self.data_metrics["data/val_prompts_dropped_overlong"] = self.val_set.num_filtered
        self.total_steps = cfg.trainer.total_steps or self.loader.total_batches
        self.mini_batches_per_step = cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size
        self.rewards = components.reward_manager(cfg)
        self.rewards.check_data_sources(train_set.data_sources() | (self.val_set.data_sources() if self.val_set else set()))
        self.sampling = components.sampling_options(cfg)
        self.kl_controller = None
        if cfg.algorithm.use_kl_in_reward:
            from megarl.algorithms import KLRewardOptions

            self.kl_controller = KLRewardOptions.from_config(cfg.algorithm.kl_ctrl).make_controller()

        from megarl.utils.ray_runtime import init_ray

        init_ray()  # the rollout engines are Ray actors, under torchrun too
        self.rollout = components.rollout_engines(cfg, num_engines=cfg.rollout.num_engines or 1, device=self.device)
        total_updates = self.total_steps * cfg.actor.ppo_epochs * self.mini_batches_per_step
        critic_updates = self.total_steps * cfg.critic.ppo_epochs * (cfg.data.train_batch_size // cfg.critic.ppo_mini_batch_size)
        self.start(MegatronTrainWorker, train_gpus(cfg), args=(cfg, total_updates, critic_updates))
        self.workers.all.attach_rollout(self.rollout.engines, components.weight_push_options(cfg, self.device))
        self.weights_pushed = False  # until the first push the engines hold the trainer's start weights
        self.rollout.weights_restorer = self._restore_engine_weights

    # ---------------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        history = []
        if self.resumed_from:  # the engines started from the HF folder: give them the checkpoint's weights
            self._push_weights()
        while self.step < self.total_steps:
            metrics = self.train_step()
            if not history:  # the start-up counts, once per run (and per resume)
                metrics.update(self.data_metrics)
            self.step += 1
            if self._due(self.cfg.trainer.save_freq) or (self.step == self.total_steps and self.cfg.trainer.save_freq != 0):
                started = time.perf_counter()
                self.save()
                metrics["timing_s/save"] = time.perf_counter() - started
                metrics["timing_s/step"] += metrics["timing_s/save"]
            if self.val_set is not None and self._due(self.cfg.trainer.test_freq):
                metrics.update(self.validate())
            self.logger.log(self.step, metrics)
            history.append(metrics)
        return history

    def train_step(self) -> dict:
        cfg, timer = self.cfg, PhaseTimer()
        prompts, results, scores, reward_metrics = self._generate_and_score(timer)
        samples = [s for per_prompt in results for s in per_prompt]
        uids = [f"{self.step}/{i}" for i, per_prompt in enumerate(results) for _ in per_prompt]
        rollout = build_rollout_batch(samples, scores, uids)
        batch = rollout.sequences
        mini_batches = mini_batch_indices(len(rollout), cfg.actor.ppo_mini_batch_size * cfg.rollout.n)

        with timer.phase("old_logprob"):
            batch = batch.with_fields(old_logprobs=self.workers.rank0.compute_logprobs(batch, Model.ACTOR, mini_batches))
        if needs_reference(cfg):
            with timer.phase("ref_logprob"):
                batch = batch.with_fields(ref_logprobs=self.workers.rank0.compute_logprobs(batch, Model.REF))
        critic_mini_batches = mini_batch_indices(len(rollout), cfg.critic.ppo_mini_batch_size * cfg.rollout.n)
        if self.use_critic:
            with timer.phase("values"):
                batch = batch.with_fields(values=self.workers.rank0.compute_values(batch, critic_mini_batches))
        estimator_inputs = self._estimator_inputs(prompts, batch, timer)
        with timer.phase("advantage"):
            batch, adv_metrics = self._advantages(batch, rollout.uids, estimator_inputs)
        updates, push = [], {}
        if self.use_critic:
            with timer.phase("update_critic"):
                updates += self.workers.rank0.update_critic(batch, critic_mini_batches)
        if self.step >= cfg.trainer.critic_warmup:  # (0 without a critic)
            with timer.phase("update"):
                updates += self.workers.rank0.update(batch, mini_batches)
            with timer.phase("weight_push"):
                push = self._push_weights()

        metrics = {**reward_metrics, **adv_metrics, **push, **_mean_of(updates)}
        metrics.update(self._rollout_metrics(rollout, batch))
        metrics.update(timer.metrics())
        metrics["perf/tokens_per_s"] = batch.num_tokens / max(metrics["timing_s/step"], 1e-9)
        return metrics

    # ---------------------------------------------------------------------------------- engines
    def _push_weights(self) -> dict:
        """The actor's weights into every engine. An engine that dies during the push is restarted
        (rollout.on_engine_failure=restart, within max_engine_restarts) and the whole push is redone:
        the surviving engines may hold a mix of old and new layers until then."""
        while True:
            try:
                push = self.workers.rank0.push_weights()
                self.weights_pushed = True
                return push
            except Exception as e:  # noqa: BLE001 - only a dead engine is handled here; the rest re-raises
                dead = self.rollout.dead_engines()
                if not dead:
                    raise
                try:
                    self.rollout.restart_engines(dead, f"died during a weight push ({e.__class__.__name__})",
                                                 restore_weights=False)
                except Exception as died:
                    raise died from e
                self.workers.all.replace_rollout_engines({i: self.rollout.engines[i] for i in dead})

    def _restore_engine_weights(self, indices: list[int]) -> None:
        """EngineGroup.weights_restorer: restarted engines get the actor's current weights (one full
        push to every engine, which also re-forms a transport's group with the new actors)."""
        self.workers.all.replace_rollout_engines({i: self.rollout.engines[i] for i in indices})
        if self.weights_pushed:
            self._push_weights()

    # ---------------------------------------------------------------------------------- parts
    def _generate_and_score(self, timer):
        """One batch of prompts with their samples and rewards. With DAPO dynamic sampling, prompt
        groups whose samples all score the same (no advantage, no gradient) are dropped and more
        batches are generated until `train_batch_size` prompts remain."""
        ds, want = self.cfg.algorithm.dynamic_sampling, self.cfg.data.train_batch_size
        prompts, results, scores, details, totals = [], [], [], [], {"reward/errors": 0.0, "reward/timeouts": 0.0}
        generated = dropped = 0
        while len(prompts) < want:
            if ds.enable and ds.max_num_gen_batches and generated >= ds.max_num_gen_batches:
                raise RuntimeError(
                    f"dynamic sampling: {generated} generated batches left only {len(prompts)} of {want} prompts "
                    "with differing rewards; raise algorithm.dynamic_sampling.max_num_gen_batches or disable it")
            batch = next(self.loader).samples
            with timer.phase("generate"):
                out = self.rollout.generate(self._requests(batch, self.sampling, generated), self.sampling)
            with timer.phase("reward"):
                reward = self._score(batch, out)
            generated += 1
            for key in totals:
                totals[key] += reward.metrics.get(key, 0.0)
            n = self.cfg.rollout.n
            for i, (prompt, samples) in enumerate(zip(batch, out)):
                group = reward.scores[i * n:(i + 1) * n]
                signal = [d.get(ds.metric, s) for d, s in zip(reward.details[i * n:(i + 1) * n], group)]
                if ds.enable and max(signal) == min(signal):
                    dropped += 1
                    continue
                prompts.append(prompt)
                results.append(samples)
                scores.extend(group)
                details.extend(reward.details[i * n:(i + 1) * n])
        prompts, results = prompts[:want], results[:want]
        scores, details = scores[: want * self.cfg.rollout.n], details[: want * self.cfg.rollout.n]
        metrics = {**summarize("reward/score", scores), **totals}
        for key in sorted({k for d in details for k in d}):
            metrics[f"reward/{key}/mean"] = sum(d.get(key, 0.0) for d in details) / len(details)
        if ds.enable:
            metrics.update({"dynamic_sampling/num_gen_batches": generated, "dynamic_sampling/dropped_groups": dropped})
        return prompts, results, scores, metrics

    def _requests(self, prompts, sampling, attempt: int = 0):
        from megarl.rollout import RolloutRequest

        # One seed per (run seed, step, prompt): a resumed run samples exactly what the original did.
        base = self.cfg.trainer.seed * 1_000_003 + self.step * 10_007 + attempt * 1_009
        return [
            RolloutRequest(prompt_token_ids=p.prompt_ids, messages=p.messages,
                           sampling=sampling.with_(seed=(base + i) % 2**31) if sampling.temperature > 0 else None)
            for i, p in enumerate(prompts)
        ]

    def _score(self, prompts, results):
        from megarl.rewards.manager import RewardRequest

        return self.rewards.score([
            RewardRequest(p.data_source, s.text, p.ground_truth, p.extra_info, len(s.token_ids), s.messages)
            for p, per_prompt in zip(prompts, results) for s in per_prompt
        ])

    def _estimator_inputs(self, prompts, batch, timer) -> dict:
        """What the advantage estimator needs beyond rewards, uids and values, from the rollout path:
        ReMax the score of each prompt's greedy response (`reward_baselines` `[samples]`, generated
        here); the optimal token baselines sum_v pi_v^2 per token (one more actor forward) with the
        old log-probs. Empty for the other estimators (no extra work)."""
        name = self.cfg.algorithm.adv_estimator
        if name == "remax":
            greedy = components.sampling_options(self.cfg, validation=True)
            with timer.phase("generate_baseline"):
                results = self.rollout.generate(self._requests(prompts, greedy), greedy)
            with timer.phase("reward_baseline"):
                scores = self._score(prompts, results).scores
            return {"reward_baselines": torch.tensor(scores, dtype=torch.float64).repeat_interleave(self.cfg.rollout.n)}
        if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
            with timer.phase("sum_pi_squared"):
                sum_pi_squared = self.workers.rank0.compute_sum_pi_squared(batch)
            return {"old_log_prob": batch.fields["old_logprobs"], "sum_pi_squared": sum_pi_squared}
        return {}

    def _advantages(self, batch, uids, estimator_inputs: dict | None = None):
        from megarl.algorithms import AdvantageOptions, apply_kl_penalty, compute_advantages

        a = self.cfg.algorithm
        mask = batch.fields["loss_mask"]
        token_rewards, metrics = batch.fields["token_rewards"], {}
        if self.kl_controller is not None:
            token_rewards, metrics = apply_kl_penalty(token_rewards, batch.fields["old_logprobs"],
                                                      batch.fields["ref_logprobs"], mask, self.kl_controller)
        values = batch.fields.get("values")
        advantages, returns = compute_advantages(
            a.adv_estimator, token_rewards, mask, uids=uids, values=values, **(estimator_inputs or {}),
            options=AdvantageOptions.from_config(a))
        valid = mask.bool()
        metrics.update(summarize("critic/advantages", advantages[valid].tolist()))
        metrics.update(summarize("critic/rewards", token_rewards.sum(-1).tolist()))
        if "reward_baselines" in (estimator_inputs or {}):
            metrics.update(summarize("critic/reward_baselines", estimator_inputs["reward_baselines"].tolist()))
        if values is not None:
            metrics.update(summarize("critic/values", values[valid].tolist()))
            metrics.update(summarize("critic/returns", returns[valid].tolist()))
            metrics["critic/vf_explained_var"] = explained_variance(values[valid], returns[valid])
        return batch.with_fields(advantages=advantages, returns=returns), metrics

    def _rollout_metrics(self, rollout, batch) -> dict:
        from megarl.algorithms import kl_divergence

        lengths = rollout.response_lengths
        metrics = {
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/max": float(max(lengths)),
            "response_length/min": float(min(lengths)),
            "response_length/clip_ratio": sum(rollout.truncated) / len(rollout.truncated),
        }
        # train–rollout mismatch: the trainer's old log-probs vs the engine's, on generated tokens
        mask = batch.fields["loss_mask"].bool()
        old, engine = batch.fields["old_logprobs"][mask], batch.fields["rollout_logprobs"][mask]
        metrics["rollout/logprob_abs_diff_mean"] = float((old - engine).abs().mean())
        metrics["rollout/logprob_abs_diff_max"] = float((old - engine).abs().max())
        metrics["rollout/kl_k3"] = float(kl_divergence(engine, old, "k3").mean())
        return metrics

    def validate(self) -> dict:
        """Greedy pass@1 on the validation set; a few generations go to the log."""
        prompts = [self.val_set[i] for i in range(len(self.val_set))]
        if self.cfg.data.val_batch_size:
            prompts = prompts[: self.cfg.data.val_batch_size]
        greedy = components.sampling_options(self.cfg, validation=True)
        results = self.rollout.generate(self._requests(prompts, greedy), greedy)
        reward = self._score(prompts, results)
        shown = "\n\n".join(f"Q: {p.messages[-1]['content']}\nA: {r[0].text!r} → {s:.2f}"
                            for p, r, s in list(zip(prompts, results, reward.scores))[:3])
        self.logger.log_text(self.step, "val/generations", shown)
        return {"val/reward/mean": sum(reward.scores) / len(reward.scores),
                "val/pass@1": sum(s >= 1.0 for s in reward.scores) / len(reward.scores)}

    # ---------------------------------------------------------------------------------- checkpoints
    # save / load / the resume rule: TrainerSkeleton. (A model-only checkpoint starts at step 0.)
    def _check_resume_state(self, path: str) -> None:
        if self.use_critic:
            _check_critic_state(path)
        super()._check_resume_state(path)

    def trainer_state(self) -> dict:
        state = {"loader": self.loader.state_dict()}
        if self.kl_controller is not None:
            state["kl_coef"] = self.kl_controller.value
        return state

    def load_trainer_state(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        if self.kl_controller is not None and "kl_coef" in state:
            self.kl_controller.value = state["kl_coef"]

    def close(self) -> None:
        self.rewards.close()
        super().close()
        self.rollout.shutdown()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the response tokens: 1 = the critic predicts
    the returns exactly, 0 = no better than their mean, < 0 = worse than that."""
    returns, values = returns.double(), values.double()
    variance = returns.var(unbiased=False)
    if variance <= 0:
        return float("nan")
    return float(1.0 - (returns - values).var(unbiased=False) / variance)


def _check_critic_state(path: str) -> None:
    """PPO resumes the critic too: a training checkpoint without critic state cannot continue it
    (a model-only checkpoint starts a fresh critic from critic.path)."""
    from megarl.checkpoint.store import CheckpointError

    state = read_trainer_state(path)
    if not state.get("model_only") and not os.path.isdir(os.path.join(path, CRITIC_SUBDIR)):
        raise CheckpointError(f"checkpoint {path} has no critic state ({CRITIC_SUBDIR}/): it was written by a run "
                              "without a critic, so PPO cannot resume from it; start from a model-only checkpoint "
                              "(megarl-convert hf-to-mcore) or set trainer.resume=disable")


def _mean_of(per_update: list[dict]) -> dict:
    keys = sorted({k for m in per_update for k in m})
    return {k: sum(m[k] for m in per_update if k in m) / sum(k in m for m in per_update) for k in keys}
