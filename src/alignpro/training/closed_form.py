"""The closed-form Align-Pro trainer (``closed-form``): fit the prompter to rho* by weighted maximum likelihood.

Align-Pro's KL-regularised objective ``max_rho E_{x' ~ rho(.|x)} R(x, x') - lam KL(rho(.|x) || rho_ref(.|x))`` has
the closed-form optimum ``rho*(x'|x) ∝ rho_ref(x'|x) exp(R(x, x') / lam)``. This trainer approximates it:

1. for each training request x, draw K rewrites x'_1..x'_K from the current sampler q (rho_ref in round 0), always
   at temperature 1 with top-p 1 (:data:`~alignpro.training.config.PROPOSAL_TEMPERATURE`), so that q's density is
   exactly the softmax whose log-probabilities step 3 uses;
2. estimate ``R(x, x'_k)`` with the frozen model and the reward (:mod:`alignpro.scoring.estimate`), averaging m
   frozen answers;
3. weight the rewrites by ``w_k = softmax_k(R_k / lam + log rho_ref(x'_k) - log q(x'_k))``: the self-normalised
   importance weights of rho* against the sampler q; in round 0, q = rho_ref and this is ``softmax(R / lam)``;
4. fit the LoRA prompter rho_theta by weighted SFT on the rewrite tokens only:
   ``min_theta - sum_x sum_k w_k log rho_theta(x'_k | x)``, a Monte-Carlo estimate of ``KL(rho* || rho_theta)`` up
   to a constant;
5. iterate (``rounds > 1``), sampling from rho_theta so later rounds look where rho* has its mass; each round logs
   the effective sample size of its weights (K: q is rho* already, 1: one rewrite carries a prompt).

Everything runs in-process with transformers + peft; the frozen model is any engine (vLLM over HTTP is faster).
The settings are :class:`~alignpro.training.config.ClosedFormConfig`; :func:`alignpro.training.pipeline.run`
supplies the data, the scorer and the evaluation. Checkpoints (:func:`save_checkpoint`) and the scored rounds
(``samples.jsonl``) are written here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignpro.engines.local import Generator, GenRequest, GenResult
from alignpro.prompter.instruction import prompter_messages
from alignpro.protocol import Contract
from alignpro.training.config import PROPOSAL_TEMPERATURE, PROPOSAL_TOP_P, ClosedFormConfig, TrainConfig
from alignpro.training.data import Example
from alignpro.training.dist import Dist

log = logging.getLogger(__name__)

POLICY = "policy"  # the trainable adapter's name inside the peft model


# ------------------------------------------------------------------------------------------------ policy
def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def row_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, default=str).encode()).digest()[:4], "big")


@dataclass
class Sample:
    """One prompter output for one request, with what training needs."""

    example: Example
    prompt_ids: list[int]
    completion_ids: list[int]  # with the end-of-turn token when the rewrite finished
    text: str
    finish_reason: str
    served: str | None = None  # the validated text (None: unusable, the original is served)
    reason: str | None = None
    reward: float = 0.0  # R(x, x')
    logp_ref: float = 0.0  # log rho_ref(x'|x); both stay 0 in round 0 (drawn from rho_ref at T=1: ratio 1)
    logp_q: float = 0.0  # under the sampler that drew it
    weight: float = 0.0


class Policy:
    """The prompter being trained: a base causal LM with one trainable LoRA adapter (``policy``). With the
    adapter disabled it is exactly rho_ref, so one model gives rho_theta, rho_ref and their log-ratios."""

    def __init__(
        self,
        base_path: str,
        *,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        adapter_path: str | Path | None = None,
        generator: Generator | None = None,
    ) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        self.gen = generator or Generator(base_path, dtype="float32")
        base = self.gen.model
        if adapter_path is not None:
            model = PeftModel.from_pretrained(base, str(adapter_path), adapter_name=POLICY, is_trainable=True)
        else:
            cfg = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(target_modules),
                task_type="CAUSAL_LM",
                bias="none",
            )
            model = get_peft_model(base, cfg, adapter_name=POLICY)
        model.eval()
        self.model = model
        self.gen.model = model
        self.gen.adapters = {POLICY: "(in memory)"}
        self.tokenizer = self.gen.tokenizer
        self.end_id = self._end_id()

    def _end_id(self) -> int:
        tok = self.tokenizer
        end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
        if isinstance(end, int) and end in self.gen.eos_ids:
            return end
        return int(tok.eos_token_id if tok.eos_token_id is not None else next(iter(self.gen.eos_ids)))

    @property
    def device(self) -> Any:
        """Where the model's weights are (the CPU, or the GPU that ``accelerate`` placed it on)."""
        return self.gen.device

    def trainable_parameters(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def prompt_ids(self, text: str, contract: Contract, context: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The prompter's input for the request ``text`` after the conversation turns ``context``."""
        return self.gen.chat_ids(prompter_messages(text, contract, context))

    def sample(
        self,
        examples: Sequence[Example],
        contract: Contract,
        k: int,
        *,
        adapter: bool,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        batch_size: int = 16,
        tag: str = "",
    ) -> list[Sample]:
        """K outputs per example from rho_theta (``adapter=True``) or rho_ref, in batches; seeded per row."""
        rows: list[tuple[Example, list[int], int]] = []
        for e in examples:
            ids = self.prompt_ids(e.prompt, contract, e.context())
            rows += [(e, ids, row_seed(seed, tag, e.id, j)) for j in range(k)]
        out: list[Sample] = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            reqs = [
                GenRequest(
                    ids, max_new_tokens, temperature, top_p, seed=s, adapter=POLICY if adapter else None
                )
                for _, ids, s in chunk
            ]
            results: list[GenResult] = self.gen.generate(reqs)
            for (e, ids, _), r in zip(chunk, results, strict=True):
                comp = list(r.token_ids) + ([self.end_id] if r.finish_reason == "stop" else [])
                out.append(Sample(e, ids, comp, r.text, r.finish_reason))
        return out

    def from_texts(
        self,
        examples: Sequence[Example],
        contract: Contract,
        outputs: Sequence[Sequence[tuple[str, str | None]]],
    ) -> list[Sample]:
        """Samples from texts drawn elsewhere (e.g. rho_ref served by vLLM), re-tokenised for training."""
        out: list[Sample] = []
        for e, outs in zip(examples, outputs, strict=True):
            ids = self.prompt_ids(e.prompt, contract, e.context())
            for text, finish in outs:
                comp = self.gen.text_ids(text) + ([self.end_id] if finish == "stop" else [])
                out.append(Sample(e, ids, comp, text, finish or "stop"))
        return out

    def sequence_logprob(self, samples: Sequence[Sample], adapter: bool, batch_size: int = 8) -> list[float]:
        """sum_t log p(x'_t | x, x'_<t) of each sample under rho_theta or rho_ref."""
        import torch

        out: list[float] = []
        with self.gen.lock, torch.inference_mode(), self.gen._adapter(POLICY if adapter else None):
            for i in range(0, len(samples), batch_size):
                lp, _ = completion_logprobs(self, samples[i : i + batch_size])
                out += [float(v) for v in lp.sum(1)]
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path), selected_adapters=[POLICY])
        # peft writes a named adapter into a sub-folder; the shipped layout is a plain peft folder.
        sub = path / POLICY
        if sub.is_dir():
            for f in sub.iterdir():
                f.replace(path / f.name)
            sub.rmdir()


def completion_logprobs(policy: Policy, samples: Sequence[Sample], net: Any = None) -> tuple[Any, Any]:
    """Per-token log-probabilities of each sample's completion under the policy's current adapter state:
    ``(logp [B, L], mask [B, L])``. Rows are left-padded so every completion ends in the last column, and only
    the L positions that predict them get logits (``logits_to_keep``): the long shared prompt never meets the LM
    head. ``net`` runs the forward pass (default: the policy's model; in training, its data-parallel wrapper)."""
    import torch

    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    keep = max(len(s.completion_ids) for s in samples)
    pad = policy.gen.pad_id
    ids = torch.full((len(samples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    cmask = torch.zeros((len(samples), keep), dtype=torch.float32)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.completion_ids
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
        if s.completion_ids:
            cmask[i, keep - len(s.completion_ids) :] = 1.0
    ids, mask, cmask = ids.to(policy.device), mask.to(policy.device), cmask.to(policy.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # position t predicts token t+1: the `keep` positions before the last predict the last `keep` tokens
    predicting = torch.arange(width - keep - 1, width - 1, device=policy.device)
    logits = (net or policy.model)(
        input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=predicting
    ).logits.float()
    target = ids[:, width - keep :]
    lp = torch.log_softmax(logits, dim=-1).gather(2, target.unsqueeze(2)).squeeze(2)
    return lp * cmask, cmask


def prefix_shared_logprobs(policy: Policy, samples: Sequence[Sample], net: Any = None) -> tuple[Any, Any]:
    """Like :func:`completion_logprobs` for samples of ONE prompt, cheaper: the shared prompt (all but its last
    token) runs once without gradients, its KV cache is repeated for the K completions, and only the completion
    tokens (plus the prompt's last token) run with gradients. The forward pass is exact; the gradient ignores the
    adapter's effect on the prompt's keys and values (a truncation that costs ~10x less on a few-shot prompt).
    ``net`` runs the forward pass with gradients (default: the policy's model)."""
    import torch

    dev = policy.device
    prompt = samples[0].prompt_ids
    assert all(s.prompt_ids == prompt for s in samples)
    keep = max(len(s.completion_ids) for s in samples)
    n = len(samples)
    with torch.no_grad():
        past = policy.model(input_ids=torch.tensor([prompt[:-1]], device=dev), use_cache=True).past_key_values
    if n > 1:
        past.batch_repeat_interleave(n)
    pad = policy.gen.pad_id
    ids = torch.full((n, keep + 1), pad, dtype=torch.long)
    cmask = torch.zeros((n, keep), dtype=torch.float32)
    for i, s in enumerate(samples):
        seq = [prompt[-1], *s.completion_ids]
        ids[i, : len(seq)] = torch.tensor(seq)
        cmask[i, : len(s.completion_ids)] = 1.0
    ids, cmask = ids.to(dev), cmask.to(dev)
    p = len(prompt) - 1
    attn = torch.ones((n, p + keep + 1), dtype=torch.long, device=dev)
    attn[:, p + 1 :] = (cmask > 0).long()  # right padding of the completions is masked out
    pos = torch.arange(p, p + keep + 1, device=dev).unsqueeze(0).expand(n, -1)
    # the last position predicts nothing we score: no LM head there (half the work for one-token rewrites)
    logits = (net or policy.model)(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos,
        past_key_values=past,
        logits_to_keep=torch.arange(keep, device=dev),
    ).logits.float()
    lp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
    return lp * cmask, cmask


def weighted_nll(policy: Policy, samples: Sequence[Sample], shared_prefix: bool = False) -> Any:
    """``sum_i w_i * NLL_i / sum_i w_i * len_i``: the weighted MLE loss, per rewrite token, on the rewrite tokens
    only (the prompt is context). ``shared_prefix`` uses :func:`prefix_shared_logprobs` per prompt."""
    num, den = weighted_nll_terms(policy, samples, shared_prefix)
    return num / den.clamp(min=1e-6)


def weighted_nll_terms(
    policy: Policy, samples: Sequence[Sample], shared_prefix: bool = False, net: Any = None
) -> tuple[Any, Any]:
    """:func:`weighted_nll`'s numerator ``sum_i w_i * NLL_i`` (with gradients) and denominator
    ``sum_i w_i * len_i`` (a constant): data-parallel ranks sum both over the global batch before dividing.
    ``net`` runs the forward passes with gradients (default: the policy's model)."""
    import torch

    policy.model.set_adapter(POLICY)
    if shared_prefix:
        by_prompt: dict[tuple[int, ...], list[Sample]] = {}
        for smp in samples:
            by_prompt.setdefault(tuple(smp.prompt_ids), []).append(smp)
        ordered = [smp for group in by_prompt.values() for smp in group]
        parts = [prefix_shared_logprobs(policy, group, net) for group in by_prompt.values()]
        nll = torch.cat([-lp.sum(1) for lp, _ in parts])
        lens = torch.cat([m.sum(1) for _, m in parts])
        w = torch.tensor([smp.weight for smp in ordered], dtype=torch.float32, device=nll.device)
        return (w * nll).sum(), (w * lens).sum()
    lp, cmask = completion_logprobs(policy, samples, net)
    nll = -lp.sum(1)
    w = torch.tensor([s.weight for s in samples], dtype=torch.float32, device=nll.device)
    return (w * nll).sum(), (w * cmask.sum(1)).sum()


def importance_weights(
    rewards: Sequence[float], lam: float, log_ratio: Sequence[float] | None = None
) -> list[float]:
    """``softmax_k(R_k / lam + log rho_ref(x'_k) - log q(x'_k))`` over one prompt's K samples; without
    ``log_ratio`` (samples from rho_ref) this is ``softmax(R / lam)``."""
    z = np.asarray(rewards, dtype=np.float64) / lam
    if log_ratio is not None:
        z = z + np.asarray(log_ratio, dtype=np.float64)
    z = z - z.max()
    e = np.exp(z)
    return [float(v) for v in e / e.sum()]


def effective_sample_size(weights: Sequence[float]) -> float:
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / max((w**2).sum(), 1e-12))


# ------------------------------------------------------------------------------------------------ loop
Scorer = Callable[[list[Sample]], None]  # fills served / reason / reward of each sample
Hook = Callable[[dict[str, Any]], None]  # called with each log record
# (rows, K) -> K (text, finish reason) prompter outputs per row, drawn elsewhere (the frozen engine)
EngineSampler = Callable[[Sequence[Example], int], list[list[tuple[str, str | None]]]]


def contract_of(cfg: TrainConfig) -> Contract:
    return "augment" if cfg.contract == "augment" else "rewrite"


def sample_rewrites(
    policy: Policy,
    examples: Sequence[Example],
    cfg: TrainConfig,
    k: int,
    *,
    adapter: bool,
    tag: str,
    exact: bool = False,
) -> list[Sample]:
    """K rewrites per example from rho_theta (``adapter=True``) or rho_ref, with the config's sampling settings;
    ``exact`` samples the untempered, untruncated softmax whatever the config says (the training proposal, KL)."""
    return policy.sample(
        examples,
        contract_of(cfg),
        k,
        adapter=adapter,
        max_new_tokens=cfg.max_new_tokens,
        temperature=PROPOSAL_TEMPERATURE if exact else cfg.temperature,
        top_p=PROPOSAL_TOP_P if exact else cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.gen_batch_size,
        tag=tag,
    )


def estimate_kl(policy: Policy, probe: Sequence[Example], cfg: TrainConfig, step: int) -> float:
    """``E_{x' ~ rho_theta}[log rho_theta(x'|x) - log rho_ref(x'|x)]`` on fresh rewrites of ``probe``."""
    if not probe:
        return 0.0
    # exact: the log-probabilities are T=1 softmaxes, so only T=1 samples make their mean difference a KL
    samples = sample_rewrites(policy, probe, cfg, 1, adapter=True, tag=f"kl-{step}", exact=True)
    theta = policy.sequence_logprob(samples, adapter=True)
    ref = policy.sequence_logprob(samples, adapter=False)
    return float(np.mean([a - b for a, b in zip(theta, ref, strict=True)]))


def train_closed_form(
    cfg: ClosedFormConfig,
    policy: Policy,
    train: Sequence[Example],
    score: Scorer,
    out_dir: Path,
    log_fn: Hook,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
    engine_sampler: EngineSampler | None = None,
    reuse_samples: bool = False,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Run the closed-form trainer; returns summary metrics. ``resume`` is the state of a checkpoint;
    ``reuse_samples`` reads already scored rounds from ``samples.jsonl`` (a resumed run, or a refit of saved samples
    at another ``lam``: their weights are recomputed). The summary has each round's ESS (mean and min over prompts) for
    the rounds this call drew or reweighed.

    Under ``accelerate launch`` (``dist``: this process's rank of several) every rank calls this alike with the same
    ``train``. Rank r draws and scores the rewrites of ``train[r::world]`` (its frozen requests go out from it), then
    every rank gathers all the scored rounds, so that each holds the same weighted set in the same order as one
    process would. The fit is data-parallel: each optimizer step takes ``prompts_per_step * world`` prompts in the
    seeded order (``prompts_per_step`` is per process, like TRL's per-device batch), rank r fits every world-th of
    them, and the ranks' gradients are averaged by DDP on a loss normalised by the global batch's weighted token
    count, which makes the step one process's step on the whole global batch. Only rank 0 writes ``samples.jsonl``
    and checkpoints, and estimates KL (``log_fn`` should be rank 0's alone)."""
    cfg.check_proposal()  # a config mutated after construction must not slip a biased proposal through
    loop = _Loop(cfg, policy, train, score, out_dir, log_fn, progress, engine_sampler, dist or Dist())
    if resume:
        loop.restore(resume)
    state = loop.state
    summary: dict[str, Any] = {}
    for rnd in range(state["round"], cfg.rounds):
        samples = loop.round_samples(rnd, reuse=bool(resume) or reuse_samples)
        resume, reuse_samples = None, False
        groups = _groups(samples, cfg)
        for epoch in range(state["epoch"] if state["round"] == rnd else 0, cfg.epochs):
            loop.fit_epoch(rnd, epoch, groups)
        state.update(round=rnd + 1, epoch=0, batch=0)
        loop.checkpoint()
        summary = {"steps": state["step"], "rounds": rnd + 1}
    summary["ess_per_round"] = {str(r): e["ess_mean"] for r, e in sorted(loop.ess.items())}
    summary["ess_min_per_round"] = {str(r): e["ess_min"] for r, e in sorted(loop.ess.items())}
    if loop.dist.main:
        summary["kl_final"] = estimate_kl(policy, loop.probe, cfg, -1)
        log_fn({"event": "final", "step": state["step"], "kl": summary["kl_final"]})
    return summary


@dataclass
class _Loop:
    """One closed-form run's moving parts: the policy with its optimiser, and the loop's position (``state``: round,
    epoch, batch within the epoch, optimizer step) that a checkpoint saves with the RNG states. The model and the
    optimiser go through accelerate's ``prepare``: on one CPU process they stay as they are; on a GPU the model moves
    there; with several processes ``net`` is the DDP wrapper whose backward averages the ranks' gradients."""

    cfg: ClosedFormConfig
    policy: Policy
    train: Sequence[Example]
    score: Scorer
    out_dir: Path
    log_fn: Hook
    progress: bool
    engine_sampler: EngineSampler | None
    dist: Dist
    state: dict[str, int] = field(default_factory=lambda: {"round": 0, "epoch": 0, "batch": 0, "step": 0})
    params: list[Any] = field(init=False)
    opt: Any = field(init=False)
    accelerator: Any = field(init=False)
    net: Any = field(init=False)  # what runs the training forward pass: the model, or its DDP wrapper
    rng: random.Random = field(init=False)
    probe: list[Example] = field(init=False)
    ess: dict[int, dict[str, float]] = field(default_factory=dict)  # per round: ess_mean, ess_min, ess_frac

    def __post_init__(self) -> None:
        import torch
        from accelerate import Accelerator

        self.params = self.policy.trainable_parameters()
        opt = torch.optim.AdamW(self.params, lr=self.cfg.learning_rate, weight_decay=0.0)
        # float32 whatever the launcher's config says: the importance weights and KL are float32 log-softmaxes
        self.accelerator = Accelerator(mixed_precision="no")
        self.net, self.opt = self.accelerator.prepare(self.policy.model, opt)
        self.rng = random.Random(self.cfg.seed)
        self.probe = list(self.train[: self.cfg.kl_probe_prompts])

    def restore(self, resume: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (:func:`load_checkpoint`)."""
        import torch

        self.state.update(resume["state"])
        self.opt.load_state_dict(resume["optimizer"])
        self.rng.setstate(_tuple_state(resume["rng"]))
        torch.set_rng_state(resume["torch_rng"])

    def checkpoint(self) -> None:
        if self.dist.main:
            save_checkpoint(self.out_dir, self.policy, self.opt, self.state, self.rng)

    def round_samples(self, rnd: int, reuse: bool) -> list[Sample]:
        """Round ``rnd``'s weighted rewrites: read back from ``samples.jsonl`` (``reuse``) where it holds them, else
        drawn, scored and appended there."""
        samples = _load_round(self.out_dir / "samples.jsonl", rnd) if reuse else None
        if samples is None:
            return self.draw_round(rnd)
        # Weights are a function of the config (lam, the importance ratios): recompute them for samples read
        # back, so a saved round can be refitted at another lam without drawing or scoring it again.
        _weigh(samples, self.cfg)
        self.ess[rnd] = _ess_stats(samples, self.cfg.k)
        self.log_fn(
            {
                "event": "reweighed",
                "round": rnd,
                "samples": len(samples),
                "lam": self.cfg.lam,
                **self.ess[rnd],
            }
        )
        return samples

    def draw_round(self, rnd: int) -> list[Sample]:
        """K rewrites per train prompt (rho_ref in round 0, rho_theta after), scored, weighed and saved (this rank's
        share of the prompts, then everybody's, in ``train``'s order)."""
        cfg, dist = self.cfg, self.dist
        t0 = time.process_time()
        mine = dist.shard(self.train)
        shares = dist.gather(self.draw_share(rnd, mine))
        if dist.world > 1:
            at = {e.id: i for i, e in enumerate(self.train)}
            samples = sorted((s for share in shares for s in share), key=lambda s: at[s.example.id])
        else:
            samples = shares[0]
        _weigh(samples, cfg)
        if dist.main:
            _save_round(self.out_dir / "samples.jsonl", rnd, samples)
        self.ess[rnd] = _ess_stats(samples, cfg.k)
        self.log_fn(
            {
                "event": "round",
                "round": rnd,
                "samples": len(samples),
                "reward_mean": float(np.mean([s.reward for s in samples])),
                "unusable": sum(s.served is None for s in samples),
                "sample_cpu_s": time.process_time() - t0,
                "prompts_per_rank": [len({s.example.id for s in share}) for share in shares],
                **self.ess[rnd],
            }
        )
        return samples

    def draw_share(self, rnd: int, train: Sequence[Example]) -> list[Sample]:
        """K rewrites of each of ``train``, scored, with their log-probabilities under rho_ref and the sampler."""
        cfg, policy = self.cfg, self.policy
        if rnd == 0 and self.engine_sampler is not None:
            # the engine must serve the prompter base at T=1, top_p=1 (pipeline.engine_rewrites) for q = rho_ref
            samples = policy.from_texts(train, contract_of(cfg), self.engine_sampler(train, cfg.k))
        else:
            samples = sample_rewrites(
                policy, train, cfg, cfg.k, adapter=rnd > 0, tag=f"round-{rnd}", exact=True
            )
        self.score(samples)
        if rnd > 0:
            # Importance correction for samples drawn from rho_theta (at T=1, so log q is its softmax's). Round 0
            # draws from rho_ref itself at T=1, where the ratio is exactly 1: its log-probs stay 0 (skipping a
            # forward pass over every sample and its few-shot prompt, ~10 min of one core for 480 samples).
            ref = policy.sequence_logprob(samples, adapter=False)
            q = policy.sequence_logprob(samples, adapter=True)
            for s, a, b in zip(samples, ref, q, strict=True):
                s.logp_ref, s.logp_q = a, b
        return samples

    def fit_epoch(self, rnd: int, epoch: int, groups: list[list[Sample]]) -> None:
        """One pass over the prompts' weighted rewrites in a seeded order, ``prompts_per_step`` prompts a step per
        process (a resumed epoch starts at the checkpoint's batch)."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        order = list(range(len(groups)))
        random.Random(row_seed(cfg.seed, "order", rnd, epoch)).shuffle(order)
        size = cfg.prompts_per_step * self.dist.world
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        start = state["batch"] if (state["round"], state["epoch"]) == (rnd, epoch) else 0
        bar = tqdm(
            total=len(batches),
            initial=start,
            desc=f"round {rnd} epoch {epoch}",
            disable=not (self.progress and self.dist.main),
        )
        for b in range(start, len(batches)):
            rec = self.step(rnd, epoch, b, [groups[g] for g in batches[b]])
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if cfg.save_steps and state["step"] % cfg.save_steps == 0:
                self.checkpoint()
        bar.close()
        state.update(epoch=epoch + 1, batch=0)

    def step(self, rnd: int, epoch: int, b: int, prompts: list[list[Sample]]) -> dict[str, Any]:
        """One optimizer step on the global batch ``prompts`` (batch ``b`` of the epoch, each prompt's fitted
        rewrites), this rank fitting its share; returns the step's log record."""
        import torch

        cfg, policy, dist = self.cfg, self.policy, self.dist
        batch = [s for g in prompts for s in g]
        # A rank left without a prompt (the epoch's last batch, when it has fewer prompts than ranks) fits one of the
        # others' rewrites at weight 0: it must still join the gradient all-reduce, and adds nothing to it.
        mine = [s for g in dist.shard(prompts) for s in g] or [dataclasses.replace(batch[0], weight=0.0)]
        t0 = time.process_time()
        policy.model.train()
        num, den = weighted_nll_terms(policy, mine, cfg.shared_prefix, self.net)
        # DDP averages the ranks' gradients: scaling by world makes the step that of sum(num) / sum(den), the
        # global batch's weighted NLL per token, which is weighted_nll on one process.
        total = torch.tensor(dist.reduce(float(den.detach())), dtype=den.dtype, device=den.device)
        loss = num * dist.world / total.clamp(min=1e-6)
        self.opt.zero_grad()
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        policy.model.eval()
        loss_value = dist.reduce(float(num.detach())) / float(total.clamp(min=1e-6))
        self.state.update(round=rnd, epoch=epoch, batch=b + 1, step=self.state["step"] + 1)
        step = self.state["step"]
        rec: dict[str, Any] = {
            "event": "step",
            "step": step,
            "round": rnd,
            "epoch": epoch,
            "loss": loss_value,
            "reward": float(np.average([s.reward for s in batch], weights=[s.weight for s in batch])),
            "reward_sampled": float(np.mean([s.reward for s in batch])),
            "step_cpu_s": time.process_time() - t0,
        }
        if cfg.kl_every and step % cfg.kl_every == 0 and dist.main:
            rec["kl"] = estimate_kl(policy, self.probe, cfg, step)
        if step % max(cfg.log_steps, 1) == 0 or "kl" in rec:
            self.log_fn(rec)
        return rec


def _weigh(samples: list[Sample], cfg: ClosedFormConfig) -> None:
    """Each prompt's self-normalised importance weights of rho* against the sampler (:func:`importance_weights`)."""
    for group in _by_prompt(samples):
        ratio = [s.logp_ref - s.logp_q for s in group]
        ws = importance_weights([s.reward for s in group], cfg.lam, ratio)
        for s, w in zip(group, ws, strict=True):
            s.weight = w


def _by_prompt(samples: Sequence[Sample]) -> list[list[Sample]]:
    by_id: dict[str, list[Sample]] = {}
    for s in samples:
        by_id.setdefault(s.example.id, []).append(s)
    return list(by_id.values())


def _ess_stats(samples: list[Sample], k: int) -> dict[str, float]:
    """The effective sample size of each prompt's K weights (K: flat, q is rho* already; 1: one rewrite takes all),
    as its mean and min over prompts and the mean as a fraction of K: how much a round's K rewrites are worth."""
    ess = [effective_sample_size([s.weight for s in group]) for group in _by_prompt(samples)]
    mean = float(np.mean(ess)) if ess else 0.0
    return {"ess_mean": mean, "ess_min": float(min(ess, default=0.0)), "ess_frac": mean / max(k, 1)}


def _groups(samples: list[Sample], cfg: ClosedFormConfig) -> list[list[Sample]]:
    """Each prompt's rewrites that are fitted: usable, non-empty, and with at least ``min_weight / K`` of weight
    (relative to the flat weight 1/K, so a flat later round is never dropped whatever K is)."""
    out = []
    for group in _by_prompt(samples):
        floor = cfg.min_weight / len(group)
        kept = [s for s in group if s.weight >= floor and s.completion_ids]
        kept = [s for s in kept if s.served is not None] if cfg.drop_unusable else kept
        if kept:
            out.append(kept)
    return out


# ------------------------------------------------------------------------------------------------ persistence
def _sample_row(rnd: int, s: Sample) -> dict[str, Any]:
    """One line of ``samples.jsonl``."""
    return {
        "round": rnd,
        **s.example.as_dict(),
        "prompt_ids": s.prompt_ids,
        "completion_ids": s.completion_ids,
        "text": s.text,
        "finish": s.finish_reason,
        "served": s.served,
        "reason": s.reason,
        "reward": s.reward,
        "logp_ref": s.logp_ref,
        "logp_q": s.logp_q,
        "weight": s.weight,
    }


def _row_sample(r: dict[str, Any]) -> Sample:
    """The inverse of :func:`_sample_row`."""
    return Sample(
        example=Example(
            r["id"],
            r["prompt"],
            r["kind"],
            tuple(r.get("instruction_id_list") or ()),
            tuple(r.get("kwargs") or ()),
        ),
        prompt_ids=r["prompt_ids"],
        completion_ids=r["completion_ids"],
        text=r["text"],
        finish_reason=r["finish"],
        served=r["served"],
        reason=r["reason"],
        reward=r["reward"],
        logp_ref=r["logp_ref"],
        logp_q=r["logp_q"],
        weight=r["weight"],
    )


def _save_round(path: Path, rnd: int, samples: list[Sample]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(_sample_row(rnd, s), ensure_ascii=False) + "\n")


def _load_round(path: Path, rnd: int) -> list[Sample] | None:
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_row_sample(r) for r in rows if r["round"] == rnd] or None


def _tuple_state(obj: Any) -> Any:
    return tuple(_tuple_state(v) for v in obj) if isinstance(obj, list) else obj


def save_checkpoint(
    out_dir: Path, policy: Policy, opt: Any, state: dict[str, Any], rng: random.Random
) -> Path:
    """``out_dir/checkpoint-<step>``: the adapter, the optimizer, RNG states and the loop position; ``latest``
    names the newest. Written to a temporary folder and renamed, so a crash never leaves half a checkpoint."""
    import shutil

    import torch

    name = f"checkpoint-{state['step']}"
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp)
    torch.save(
        {
            "state": dict(state),
            "optimizer": opt.state_dict(),
            "rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        },
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (out_dir / "latest").write_text(name)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    marker = out_dir / "latest"
    if marker.is_file():
        path = out_dir / marker.read_text().strip()
        if (path / "trainer_state.pt").is_file():
            return path
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = torch.load(path / "trainer_state.pt", weights_only=False)
    return state
