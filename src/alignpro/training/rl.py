"""The RL Align-Pro trainer (``rl``): KL-regularised policy gradient with TRL's GRPO (or RLOO).

The prompter rho_theta (a LoRA adapter on the prompter base) is trained to maximise
``E_{x' ~ rho_theta(.|x)} R(x, x') - beta KL(rho_theta || rho_ref)`` with ``beta = lam``. With a peft model TRL
computes the reference log-probabilities with the adapter disabled, i.e. under rho_ref itself. The reward of a
completion x' is the R estimate of :mod:`alignpro.scoring.estimate`: the output is validated as the gateway
would (an unusable one serves the original prompt), the frozen model answers, and the reward scores the answer
on the ORIGINAL request.

What TRL 1.x optimises with ``beta`` (read from ``trl/trainer/grpo_trainer.py`` and ``rloo_trainer.py``, 1.16):

* GRPO adds ``beta * k3`` to each sampled token's loss, ``k3 = exp(ref - logp) - (ref - logp) - 1`` with ``logp``,
  ``ref`` the token's log-probability under rho_theta and rho_ref (adapter disabled). Under tokens sampled from
  rho_theta, ``E[k3] = KL(rho_theta(.|s) || rho_ref(.|s))``: the logged ``kl`` is the paper's direction. Its gradient
  as a loss is another matter: with the samples held fixed, ``E[grad k3] = grad KL(rho_ref(.|s) || rho_theta(.|s))``,
  the REVERSED direction (the two gradients agree only near rho_ref). TRL's ``use_bias_correction_kl`` (True by
  default in 1.16) multiplies k3 by the ratio ``pi_theta / pi_old``, 1 in value but differentiable, which adds
  ``E[k3 grad logp]`` and makes the gradient that of ``KL(rho_theta(.|s) || rho_ref(.|s))``, the paper's direction,
  per token. We set it explicitly (:func:`_trainer_args`) so that a changed default cannot flip the direction
  (``tests/unit/training/test_closed_form_math.py`` checks both gradients). It stays a per-token penalty at the
  visited states: the term through which theta changes the later states (the KL still to come, as a return) is
  left out, so it is a biased gradient of the sequence-level ``KL(rho_theta || rho_ref)`` away from rho_ref.
* ``scale_rewards="none"`` (our default): the advantage is ``r - mean_group(r)`` in reward units, so the loss is a
  policy-gradient estimate of ``E[R] - beta KL`` with ``beta = lam``. ``group``/``batch`` divide the advantages by a
  reward standard deviation, which multiplies the effective lam by that (varying) spread. ``loss_type="dapo"``
  averages both terms over the batch's tokens, one common factor, so it leaves their ratio alone.
* RLOO puts the KL in the reward: ``r - beta * sum_t (logp_old - ref)``, a sequence-level estimate of
  ``KL(rho_theta || rho_ref)`` in a score-function gradient (unnormalised advantages by default): the paper's
  objective exactly, at the cost of a noisier KL estimate.

Both compute log-probabilities of ``logits / temperature`` and ignore ``top_p``: sample at temperature 1 with top-p 1
(the defaults) so that the policy optimised is the prompter's softmax and its samples are the ones scored.

Generation runs with transformers (CPU here); ``use_vllm`` hands it to a ``trl vllm-serve`` server on a GPU.
Under ``accelerate launch`` TRL runs data-parallel itself (its sampler splits the prompts, each rank generates and
scores its share, DDP averages the gradients; ``prompts_per_step`` is per process). This wrapper keeps out of its way:
every rank's :class:`RReward` sends its own frozen requests, only rank 0 logs (``log_fn``) and saves the adapter, and
``cpu_budget_s`` stops every rank at the same step (the ranks' largest CPU time decides).
TRL's own checkpoints give ``--resume``; its log lines feed the JSON-lines log and the curves. The settings are
:class:`~alignpro.training.config.RLConfig`; :func:`alignpro.training.pipeline.run` supplies the data, the R
estimator and the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignpro import embedded
from alignpro.errors import ConfigError
from alignpro.prompter.instruction import conversation_context, prompter_messages
from alignpro.prompter.validate import OutputValidator
from alignpro.protocol import Contract
from alignpro.scoring.estimate import LoopThread, REstimator
from alignpro.settings import DEFAULT_CONTEXT_TURNS
from alignpro.training.config import RLConfig
from alignpro.training.data import Example, reward_columns
from alignpro.training.dist import Dist

log = logging.getLogger(__name__)


class RReward:
    """R(x, x') as a TRL reward function: ``f(prompts, completions, completion_ids, original, kind, ...)``."""

    __name__ = "R"

    def __init__(
        self,
        estimator: REstimator,
        runner: LoopThread,
        validator: OutputValidator,
        contract: Contract,
        max_new_tokens: int,
    ) -> None:
        self.estimator, self.runner, self.validator = estimator, runner, validator
        self.contract: Contract = contract
        self.max_new_tokens = max_new_tokens
        self.unusable = 0
        self.seen = 0

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        original: list[str] | None = None,
        kind: list[str] | None = None,
        constraints: list[str] | None = None,
        history: list[str] | None = None,
        **kw: Any,
    ) -> list[float]:
        if original is None or kind is None:
            raise ValueError("the R reward needs the dataset's `original` and `kind` columns")
        served: list[str | None] = []
        # a conversation row's earlier turns (JSON (role, text) pairs; see make_dataset)
        turns = [[tuple(t) for t in json.loads(h)] for h in history] if history else [[] for _ in original]
        contexts = [conversation_context(t, DEFAULT_CONTEXT_TURNS) for t in turns]
        contexts_text = ["\n".join(text for _, text in c) for c in contexts]
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        self.validator.prefetch(list(original) + [t.strip() for t in texts])
        for i, text in enumerate(texts):
            ids = completion_ids[i] if completion_ids is not None else []
            finish = "length" if len(ids) >= self.max_new_tokens else "stop"
            parsed = self.validator(original[i], text, finish, self.contract, contexts_text[i])
            served.append(parsed.text)
            self.unusable += parsed.text is None
        self.seen += len(completions)
        return self.estimator.estimate(
            self.runner, original, served, kind, columns=_columns(constraints), histories=turns
        )


def _columns(constraints: list[str] | None) -> dict[str, list[Any]] | None:
    """The reward columns of a batch from the dataset's JSON ``constraints`` column (see :func:`make_dataset`)."""
    if not constraints:
        return None
    rows = [json.loads(c) for c in constraints]
    return {
        "instruction_id_list": [(r.get("instruction_id_list") or [[]])[0] for r in rows],
        "kwargs": [(r.get("kwargs") or [[]])[0] for r in rows],
    }


def make_dataset(examples: Sequence[Example], contract: Contract) -> Any:
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": prompter_messages(e.prompt, contract, e.context()),
                "original": e.prompt,
                "history": json.dumps([list(t) for t in e.history], ensure_ascii=False),
                "kind": e.kind,
                "id": e.id,
                # JSON: Arrow cannot hold the kwargs dicts, whose keys differ from row to row.
                "constraints": json.dumps(reward_columns([e]), ensure_ascii=False),
            }
            for e in examples
        ]
    )


# TRL's log keys -> the names in log.jsonl
LOG_KEYS = (
    ("loss", "loss"),
    ("reward", "reward"),
    ("kl", "kl"),
    ("reward_std", "reward_std"),
    ("completions/mean_length", "rewrite_tokens"),
    ("entropy", "entropy"),
)


def train_rl(
    cfg: RLConfig,
    base_path: str,
    train: Sequence[Example],
    reward: RReward,
    out_dir: Path,
    log_fn: Callable[[dict[str, Any]], None],
    resume: bool = False,
    progress: bool = True,
    dist: Dist | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train with TRL; returns (the trained peft model, summary metrics). Checkpoints go to ``out_dir``. ``log_fn``
    is called on every rank (pass rank 0's log and a no-op elsewhere); ``dist`` is this process's rank."""
    contract: Contract = "augment" if cfg.contract == "augment" else "rewrite"
    tok, model = _load_base(base_path)
    args, trainer_cls = _trainer_args(cfg, out_dir, progress)
    t_start = time.process_time()
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=make_dataset(train, contract),
        processing_class=tok,
        peft_config=_lora_config(cfg),
        callbacks=[_log_bridge(cfg, reward, log_fn, t_start, dist or Dist())],
    )
    out = trainer.train(resume_from_checkpoint=True if resume else None)
    summary = {"steps": int(trainer.state.global_step), "train_loss": float(out.training_loss)}
    return trainer.model, summary


def _load_base(base_path: str) -> tuple[Any, Any]:
    """The prompter base's tokenizer (with a pad token) and model, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with embedded.LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


def _lora_config(cfg: RLConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def _common_args(cfg: RLConfig, out_dir: Path, progress: bool) -> dict[str, Any]:
    """The TRL training arguments GRPO and RLOO share."""
    import torch

    return dict(
        output_dir=str(out_dir),
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.k,
        gradient_accumulation_steps=1,
        max_steps=cfg.max_steps,
        num_generations=cfg.k,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.lam,
        logging_steps=max(cfg.log_steps, 1),
        save_steps=cfg.save_steps or cfg.max_steps,
        save_strategy="steps",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
    )


def _trainer_args(cfg: RLConfig, out_dir: Path, progress: bool) -> tuple[Any, Any]:
    """(TRL's config, TRL's trainer class) for ``cfg.algorithm``."""
    common = _common_args(cfg, out_dir, progress)
    vllm: dict[str, Any] = dict(
        use_vllm=cfg.use_vllm, vllm_mode="server", vllm_server_base_url=cfg.vllm_server_base_url
    )
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        # Without the bias correction the k3 penalty's gradient is that of KL(rho_ref || rho_theta), the reversed
        # direction (module docstring); TRL versions that lack the option cannot optimise the paper's KL.
        if "use_bias_correction_kl" not in {f.name for f in dataclasses.fields(GRPOConfig)}:
            raise ConfigError(
                "algorithm: grpo needs a TRL with GRPOConfig.use_bias_correction_kl (see constraints.txt); "
                "or use algorithm: rloo, whose KL is in the reward"
            )
        args = GRPOConfig(
            **common,
            loss_type=cfg.loss_type,
            scale_rewards=cfg.scale_rewards,
            use_bias_correction_kl=True,
            **vllm,
        )
        return args, GRPOTrainer
    if cfg.algorithm == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        return RLOOConfig(**common, **vllm), RLOOTrainer
    raise ValueError(f"unknown algorithm {cfg.algorithm!r}; expected grpo or rloo")


def _log_bridge(
    cfg: RLConfig, reward: RReward, log_fn: Callable[[dict[str, Any]], None], t_start: float, dist: Dist
) -> Any:
    """A TRL callback: TRL's log lines into ``log_fn`` (with the unusable rate and the CPU seconds since
    ``t_start``), and the stop once ``cpu_budget_s`` is spent by any rank (every rank must stop at the same step, or
    the others would wait forever in the next gradient all-reduce)."""
    from transformers import TrainerCallback

    class LogBridge(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not logs or "train_runtime" in logs:
                return
            rec = {"event": "step", "step": int(state.global_step)}
            for src, dst in LOG_KEYS:
                if src in logs:
                    rec[dst] = float(logs[src])
            rec["unusable_rate"] = reward.unusable / max(reward.seen, 1)
            rec["cpu_s"] = time.process_time() - t_start
            log_fn(rec)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cfg.cpu_budget_s is None:
                return
            cpu_s = dist.reduce(time.process_time() - t_start, "max")
            if cpu_s >= cfg.cpu_budget_s:
                log_fn({"event": "cpu_budget_reached", "step": int(state.global_step), "cpu_s": cpu_s})
                control.should_training_stop = True

    return LogBridge()
