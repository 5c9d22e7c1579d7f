"""The closed-form trainer's mathematics, against distributions known in closed form.

The end-to-end check: on a tiny model whose next-token distribution rho_ref is computed exactly (one-token
rewrites, the vocabulary's softmax), with a deterministic R (1 on a token set A, 0 elsewhere), Align-Pro's optimum
``rho* = rho_ref exp(R/lam) / Z`` gives ``rho*(A) = rho_ref(A) e^{1/lam} / (rho_ref(A) e^{1/lam} + 1 - rho_ref(A))``.
The real trainer (sampling, weights, weighted MLE, an importance-corrected second round) must land on it: a proposal
at another temperature or top-p weighted as rho_ref, or wrong weights, lands elsewhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from alignpro.engines.local import Generator
from alignpro.errors import ConfigError
from alignpro.training import closed_form as cf
from alignpro.training.config import ClosedFormConfig, RLConfig, make_config
from alignpro.training.data import Example

LAM = 0.5
REF_MASS = 0.3  # rho_ref(A) the shaped model is built to have
N_A = 8  # |A|: a few tokens holding REF_MASS, so a temperature != 1 moves their mass a lot
STEER = 3.0  # |u| of the offset (see shape_model)
PROMPT = Example("only", "tell me about rivers", "benign")


# ------------------------------------------------------------------------------------------------ weights
def test_importance_weights_estimate_rho_star_from_any_proposal() -> None:
    """Self-normalised weights softmax(R/lam + log rho_ref - log q) turn draws from q into rho* expectations, and
    the ESS of N such weights is N / E_q[(rho*/q)^2], the textbook value."""
    ref = np.array([0.2, 0.3, 0.5])
    r = np.array([1.0, 0.0, 0.5])
    lam = 0.5
    star = ref * np.exp(r / lam) / (ref * np.exp(r / lam)).sum()
    q = np.array([0.5, 0.25, 0.25])
    draws = np.random.default_rng(0).choice(3, size=20000, p=q)
    log_ratio = (np.log(ref[draws]) - np.log(q[draws])).tolist()
    w = np.array(cf.importance_weights(r[draws].tolist(), lam, log_ratio))
    assert w.sum() == pytest.approx(1.0)
    assert [w[draws == i].sum() for i in range(3)] == pytest.approx(list(star), abs=0.01)
    ess = cf.effective_sample_size(w.tolist())
    assert ess / len(draws) == pytest.approx(1 / (star**2 / q).sum(), rel=0.02)
    # drawn from rho* itself the weights are flat: ESS = N exactly
    on_target = cf.importance_weights(
        r[draws].tolist(), lam, (np.log(ref[draws]) - np.log(star[draws])).tolist()
    )
    assert cf.effective_sample_size(on_target) == pytest.approx(len(draws))
    assert cf.effective_sample_size([1.0, 0.0, 0.0]) == pytest.approx(1.0)


def test_closed_form_rejects_a_tempered_or_truncated_proposal() -> None:
    for bad in ({"temperature": 0.8}, {"top_p": 0.95}):
        with pytest.raises(ConfigError, match="exact density"):
            make_config({"trainer": "closed-form", **bad})
        with pytest.raises(ConfigError, match="exact density"):
            ClosedFormConfig(**bad)  # type: ignore[arg-type]
    cfg = ClosedFormConfig()
    assert (cfg.temperature, cfg.top_p) == (1.0, 1.0)
    assert cfg.k >= 12 and cfg.m >= 4 and cfg.rounds >= 2  # R-hat noise and importance-corrected rounds
    cfg.temperature = 0.8  # a mutated config is caught when training starts
    with pytest.raises(ConfigError):
        cf.train_closed_form(cfg, None, [], lambda s: None, Path("."), lambda r: None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ RL KL direction
def test_rl_defaults_keep_lam_in_reward_units_and_the_papers_kl_direction(tmp_path: Path) -> None:
    """GRPO's unscaled advantages keep beta = lam, and the k3 penalty with TRL's bias correction has the gradient of
    KL(rho_theta || rho_ref) (without it, of KL(rho_ref || rho_theta)): rl.py's docstring."""
    cfg = RLConfig(output_dir=str(tmp_path), lam=0.25, k=2)
    assert cfg.scale_rewards == "none"
    assert (cfg.temperature, cfg.top_p) == (1.0, 1.0)
    pytest.importorskip("trl")
    from alignpro.training.rl import _trainer_args

    args, _ = _trainer_args(cfg, tmp_path, progress=False)
    assert args.beta == 0.25 and args.scale_rewards == "none" and args.use_bias_correction_kl is True

    # TRL's per-token penalty (grpo_trainer.py, _compute_loss) on one state's categorical policy, in expectation
    # over tokens drawn from pi_theta (the sampling distribution held fixed, as in the loss).
    ref = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64), 0)
    theta = torch.tensor([0.3, 0.8, -0.5, 0.0], dtype=torch.float64, requires_grad=True)

    def grad(loss_of: Any) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss_of(torch.log_softmax(theta, 0)), theta)
        return g

    def k3(logp: torch.Tensor, corrected: bool) -> torch.Tensor:
        per_token = torch.exp(ref - logp) - (ref - logp) - 1
        if corrected:  # use_bias_correction_kl: times pi_theta / pi_old, 1 in value
            per_token = per_token * torch.exp(logp - logp.detach())
        return (logp.detach().exp() * per_token).sum()

    forward = grad(lambda lp: (lp.exp() * (lp - ref)).sum())  # KL(pi_theta || pi_ref)
    reverse = grad(lambda lp: (ref.exp() * (ref - lp)).sum())  # KL(pi_ref || pi_theta)
    assert grad(lambda lp: k3(lp, corrected=True)) == pytest.approx(forward.tolist())
    assert grad(lambda lp: k3(lp, corrected=False)) == pytest.approx(reverse.tolist())
    assert not torch.allclose(forward, reverse, atol=1e-2)


# ------------------------------------------------------------------------------------------------ end to end
@dataclass
class Known:
    policy: cf.Policy
    ids: list[int]  # the prompt's token ids
    a: set[int]  # the rewarded tokens
    ref_a: float  # rho_ref(A), exact

    @property
    def star_a(self) -> float:
        """rho*(A) in closed form."""
        up = self.ref_a * math.exp(1 / LAM)
        return up / (up + 1 - self.ref_a)


def next_token_probs(policy: cf.Policy, ids: list[int], adapter: bool) -> torch.Tensor:
    """The exact distribution of a one-token rewrite under rho_theta (``adapter``) or rho_ref, at temperature 1."""
    model: Any = policy.model
    with torch.no_grad():
        if adapter:
            model.set_adapter(cf.POLICY)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        else:
            with model.disable_adapter():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), -1)


def shape_model(gen: Generator, ids: list[int]) -> list[int]:
    """Give N_A tokens (none in the prompt, none special) a common embedding offset c = g * h0/|h0| + u, with u a
    unit vector orthogonal to the prompt's last hidden state h0: the g part lifts their logits so that they hold
    REF_MASS of rho_ref, and the u part lets an adapter that turns h0 towards u lift them all together, so the LoRA
    family holds (nearly) every tilt rho_ref exp(theta 1_A) / Z, rho* among them. Returns A."""
    model: Any = gen.model
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied: one edit moves both
    taboo = set(ids) | set(gen.eos_ids) | set(gen.tokenizer.all_special_ids)
    order = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0)).tolist()
    a = [t for t in order if t not in taboo][:N_A]
    with torch.no_grad():
        h0 = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
        logits = (emb.double() @ h0).exp()
        in_a = torch.zeros(emb.shape[0], dtype=torch.bool)
        in_a[a] = True
        lift = math.log(REF_MASS / (1 - REF_MASS) * float(logits[~in_a].sum() / logits[in_a].sum()))
        u = torch.randn(h0.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        u = u - (u @ h0) / (h0 @ h0) * h0
        offset = lift * h0 / (h0 @ h0) + STEER * u / u.norm()
        emb[a] += offset.to(emb.dtype)
    return a


class ShortPromptPolicy(cf.Policy):
    """The trainer's policy with the user's text as the whole prompt, not the few-shot prompter chat: the math is
    the same, and the generator's first forward pass computes the vocabulary's logits at every prompt position,
    which for 370 prompt tokens and K rows would be most of the test's time."""

    def prompt_ids(self, text: str, contract: Any, context: Any = ()) -> list[int]:
        return self.gen.text_ids(text)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the tiny model's operations are too small to share, and on a loaded machine a second thread
    mostly spins (several times the CPU seconds for the same work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def known(tiny_model: Path, one_thread: None) -> Known:
    gen = Generator(str(tiny_model), dtype="float32")
    cf.set_seed(0)  # the LoRA initialisation
    ids = gen.text_ids(PROMPT.prompt)
    a = shape_model(gen, ids)
    policy = ShortPromptPolicy(str(tiny_model), generator=gen, lora_r=4, lora_alpha=8)
    assert policy.prompt_ids(PROMPT.prompt, "rewrite") == ids
    ref = next_token_probs(policy, ids, adapter=False)
    return Known(policy, ids, set(a), float(ref[a].sum()))


def indicator_reward(a: set[int]) -> cf.Scorer:
    """R(x, x') = 1 if the one-token rewrite is in A, else 0 (exact: no frozen model, no noise)."""

    def score(samples: list[cf.Sample]) -> None:
        for s in samples:
            s.served = s.text
            s.reward = 1.0 if s.completion_ids[:1] and s.completion_ids[0] in a else 0.0

    return score


def _read_samples(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]


def test_closed_form_fits_rho_star_on_a_known_distribution(known: Known, tmp_path: Path) -> None:
    assert 0.25 < known.ref_a < 0.35  # the shaped model holds REF_MASS on A
    cfg = ClosedFormConfig(
        output_dir=str(tmp_path),
        max_new_tokens=1,  # a rewrite is one token: rho_ref is the next-token softmax
        k=192,  # the last round's weights estimate rho*(A) to ~0.03 (one standard deviation)
        lam=LAM,
        rounds=2,  # round 1 draws from rho_theta and is importance-corrected
        epochs=15,
        prompts_per_step=1,
        learning_rate=5e-3,
        min_weight=0.0,
        drop_unusable=False,
        shared_prefix=True,
        gen_batch_size=64,
        save_steps=0,
        kl_every=0,
        kl_probe_prompts=1,
        seed=0,
    )
    logs: list[dict[str, Any]] = []
    summary = cf.train_closed_form(
        cfg, known.policy, [PROMPT], indicator_reward(known.a), tmp_path, logs.append, progress=False
    )
    fitted = next_token_probs(known.policy, known.ids, adapter=True)
    fitted_a = float(fitted[sorted(known.a)].sum())
    # what the last round's weights say rho*(A) is (the fit's target, up to its K samples' noise)
    last = [smp for smp in _read_samples(tmp_path) if smp["round"] == cfg.rounds - 1]
    target = sum(
        smp["weight"] for smp in last if smp["completion_ids"][:1] and smp["completion_ids"][0] in known.a
    )
    numbers = (
        f"rho_ref(A)={known.ref_a:.4f} rho*(A)={known.star_a:.4f} fitted={fitted_a:.4f} weights={target:.4f}"
    )
    print(numbers)  # pytest -s shows them
    # Seeds 0-3 fit within 0.03 of rho*(A) = 0.76. Broken on purpose, seed 0 fits: 0.999 with the proposal drawn at
    # T=0.8 but weighted as rho_ref (0.997 with top-p 0.95 too), 0.53 with weights softmax(R) instead of softmax(R/lam),
    # 0.97 when round 1 (drawn from rho_theta) drops its log-ratio; rho_ref(A) is 0.30.
    assert fitted_a == pytest.approx(known.star_a, abs=0.06), numbers
    assert fitted_a - known.ref_a > 0.3, numbers
    # the ESS of each round is logged and summarised; round 1 samples near rho*, so its weights are flatter
    rounds = [r for r in logs if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["ess_mean"] > 1 for r in rounds)
    assert summary["ess_per_round"] == {"0": rounds[0]["ess_mean"], "1": rounds[1]["ess_mean"]}
    assert rounds[1]["ess_frac"] > rounds[0]["ess_frac"]
