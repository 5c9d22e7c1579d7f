"""The prompter trainers' settings: one dataclass per trainer, TRL style (each field's ``help`` metadata is what
``alignpro train --help-config`` prints), and the YAML loading behind ``alignpro train CONFIG.yaml``.

* :class:`TrainConfig`: what every trainer shares (data, prompter sampling, the frozen model, LoRA, optimiser);
* :class:`ClosedFormConfig` (``trainer: closed-form``): :mod:`alignpro.training.closed_form`;
* :class:`RLConfig` (``trainer: rl``): :mod:`alignpro.training.rl`.

YAML keys are the field names; ``trainer`` picks the class (:func:`make_config`), and an unknown key is an error.

The prompter samples at temperature 1 with top-p 1 by default: Align-Pro's objective and its optimum
``rho* ∝ rho_ref exp(R/lam)`` are about the prompter's own softmax, and every log-probability the trainers compute is
of that softmax. The closed-form trainer requires it (:data:`PROPOSAL_TEMPERATURE`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignpro.errors import ConfigError

# The closed-form trainer's proposal q (the sampler of its K rewrites per prompt) is the prompter's untempered,
# untruncated softmax: rho_ref in round 0, rho_theta after. Its importance weights
# softmax(R/lam + log rho_ref - log q) need q's exact density, and the log-probabilities the trainer computes are T=1
# softmaxes; a tempered or nucleus-truncated sampler is another q, whose density nobody computes, and round 0
# (weighted as if q = rho_ref) would fit a sharpened rho_ref^(1/T)-like target instead of rho*.
PROPOSAL_TEMPERATURE = 1.0
PROPOSAL_TOP_P = 1.0


@dataclass
class TrainConfig:
    """What every prompter trainer shares. YAML keys are these field names; ``trainer`` picks the algorithm."""

    trainer: str = field(default="closed-form", metadata={"help": "closed-form | rl"})
    output_dir: str = field(
        default="runs/prompter", metadata={"help": "Checkpoints, logs, curves and the adapter."}
    )
    data: list[str] = field(
        default_factory=lambda: [
            "../shared/data/prompts/advbench.jsonl",
            "../shared/data/prompts/ifbench_dev.jsonl",
            "../shared/data/prompts/normal_instructions.jsonl",
        ],
        metadata={"help": "Prompt sources: JSONL/CSV files, folders, or offline Hugging Face dataset names."},
    )
    train_percent: int = field(
        default=80, metadata={"help": "sha256(id) mod 100 < this is train; the rest dev."}
    )
    train_limit: int | None = field(default=None, metadata={"help": "Train prompts used (balanced by kind)."})
    dev_limit: int = field(default=40, metadata={"help": "Dev prompts for the final evaluation (0: skip)."})
    base_model: str = field(
        default="embedded", metadata={"help": "The prompter base: 'embedded' or a folder."}
    )
    reward: str = field(default="safe-and-helpful", metadata={"help": "A reward spec for load_reward."})
    contract: str = field(default="rewrite", metadata={"help": "rewrite | augment"})
    lam: float = field(default=0.1, metadata={"help": "KL weight lambda (> 0); rho* ∝ rho_ref exp(R/lam)."})
    # prompter sampling
    k: int = field(
        default=12,
        metadata={"help": "Rewrites drawn per prompt (K); the self-normalised weights need a dozen or more."},
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Longest rewrite; a truncated one is unusable."}
    )
    temperature: float = field(
        default=PROPOSAL_TEMPERATURE,
        metadata={"help": "Prompter sampling temperature (1: the policy whose KL to rho_ref is penalised)."},
    )
    top_p: float = field(
        default=PROPOSAL_TOP_P,
        metadata={"help": "Prompter nucleus sampling (1: log-probabilities are of what was sampled)."},
    )
    gen_batch_size: int = field(default=16, metadata={"help": "Rows decoded together by the prompter."})
    # frozen model, for R
    frozen_engine: str = field(
        default="local", metadata={"help": "local (in-process) | openai (vLLM over HTTP)."}
    )
    frozen_model: str = field(
        default="embedded", metadata={"help": "local: folder or 'embedded'; openai: id."}
    )
    frozen_urls: list[str] = field(
        default_factory=list, metadata={"help": "openai: base URLs ending in /v1."}
    )
    m: int = field(
        default=4,
        metadata={"help": "Frozen answers per rewrite for the R estimate (its noise variance falls as 1/m)."},
    )
    response_max_tokens: int = field(
        default=64, metadata={"help": "Longest frozen answer while estimating R."}
    )
    response_temperature: float = field(default=0.7, metadata={"help": "Frozen sampling temperature."})
    concurrency: int = field(default=16, metadata={"help": "Frozen requests in flight."})
    frozen_server_pid: int | None = field(
        default=None,
        metadata={"help": "pid of a local vLLM server whose CPU time counts in the training budget."},
    )
    # LoRA and optimisation
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (vLLM serves rank <= max_lora_rank)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout (0 keeps CPU runs deterministic)."}
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "LoRA targets."}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate for the LoRA weights."})
    seed: int = field(default=0, metadata={"help": "Seeds sampling, the split order and initialisation."})
    save_steps: int = field(default=10, metadata={"help": "Optimizer steps between checkpoints."})
    log_steps: int = field(default=1, metadata={"help": "Optimizer steps between log lines."})
    kl_probe_prompts: int = field(
        default=4, metadata={"help": "Train prompts whose fresh rewrites estimate KL."}
    )
    kl_every: int = field(default=5, metadata={"help": "Optimizer steps between KL estimates."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's default)."})


@dataclass
class ClosedFormConfig(TrainConfig):
    """The closed-form trainer (weighted MLE towards rho*)."""

    trainer: str = field(default="closed-form", metadata={"help": "closed-form"})
    temperature: float = field(
        default=PROPOSAL_TEMPERATURE,
        metadata={"help": "Must be 1: the proposal's exact density enters the importance weights."},
    )
    top_p: float = field(
        default=PROPOSAL_TOP_P,
        metadata={"help": "Must be 1: the proposal's exact density enters the importance weights."},
    )
    rounds: int = field(
        default=3,
        metadata={
            "help": "Sample -> weight -> fit rounds; round r>0 samples rho_theta and importance-corrects to "
            "rho*, so later rounds look where rho* has its mass (the ESS of each round is logged)."
        },
    )
    epochs: int = field(default=2, metadata={"help": "Passes over the weighted rewrites per round."})
    prompts_per_step: int = field(
        default=2, metadata={"help": "Prompts (each with its K rewrites) per step."}
    )
    min_weight: float = field(
        default=0.05,
        metadata={
            "help": "Skip rewrites whose weight is below min_weight / K (a fraction of the flat weight 1/K): at "
            "most this share of a prompt's mass is dropped, whatever K."
        },
    )
    sample_with_engine: bool = field(
        default=False,
        metadata={
            "help": "Round 0 draws the rho_ref rewrites through the frozen engine (n=K per request). Valid "
            "only when it serves the prompter's base model (the default: both are SmolLM2); with vLLM's "
            "prefix cache the shared few-shot prompt is computed once."
        },
    )
    shared_prefix: bool = field(
        default=False,
        metadata={
            "help": "Run each prompt once without gradients and only the K rewrites with them (exact loss, "
            "truncated gradient, ~10x cheaper on the few-shot prompter prompt)."
        },
    )
    drop_unusable: bool = field(
        default=True, metadata={"help": "Never imitate unusable rewrites (empty/truncated/off-topic)."}
    )

    def __post_init__(self) -> None:
        self.check_proposal()

    def check_proposal(self) -> None:
        """Raise :class:`ConfigError` unless the proposal is the untempered, untruncated prompter (see
        :data:`PROPOSAL_TEMPERATURE`)."""
        if (self.temperature, self.top_p) != (PROPOSAL_TEMPERATURE, PROPOSAL_TOP_P):
            raise ConfigError(
                f"closed-form samples its rewrites at temperature {PROPOSAL_TEMPERATURE:g} and top_p "
                f"{PROPOSAL_TOP_P:g} (got temperature={self.temperature:g}, top_p={self.top_p:g}): its importance "
                "weights softmax(R/lam + log rho_ref - log q) need the sampler's exact density, which a tempered "
                "or truncated sampler does not have"
            )


@dataclass
class RLConfig(TrainConfig):
    """The RL trainer (TRL GRPO/RLOO with beta = lam)."""

    trainer: str = field(default="rl", metadata={"help": "rl"})
    algorithm: str = field(default="grpo", metadata={"help": "grpo | rloo (TRL trainers)."})
    max_steps: int = field(default=20, metadata={"help": "Optimizer steps."})
    prompts_per_step: int = field(default=2, metadata={"help": "Prompts per step; each gets K generations."})
    loss_type: str = field(default="dapo", metadata={"help": "GRPO loss normalisation (TRL's loss_type)."})
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "GRPO advantage scaling: none | group | batch. none keeps the advantages in reward units, so "
            "beta = lam weighs the KL as in r - lam KL; group/batch divide by a reward spread, which rescales lam."
        },
    )
    cpu_budget_s: float | None = field(
        default=None,
        metadata={
            "help": "Stop after the step that brings this process's CPU time past this many seconds (for "
            "comparing trainers at the same CPU budget; max_steps still bounds the run)."
        },
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with a trl vllm-serve server (GPU)."})
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "use_vllm: the trl vllm-serve URL."}
    )


def config_classes() -> dict[str, type[TrainConfig]]:
    """The config class of each ``trainer`` name."""
    return {"closed-form": ClosedFormConfig, "rl": RLConfig}


def make_config(raw: dict[str, Any]) -> TrainConfig:
    """The trainer's config dataclass from a dict (YAML), checking the keys."""
    trainer = str(raw.get("trainer", "closed-form"))
    classes = config_classes()
    if trainer not in classes:
        raise ConfigError(f"unknown trainer {trainer!r}; expected one of {', '.join(classes)}")
    cls = classes[trainer]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown {trainer} setting(s) {', '.join(unknown)}; see `alignpro train --help-config`"
        )
    cfg = cls(**raw)
    if cfg.lam <= 0:
        raise ConfigError("lam must be > 0")
    if cfg.contract not in ("rewrite", "augment"):
        raise ConfigError("contract must be rewrite or augment")
    if isinstance(cfg.data, str):
        cfg.data = [cfg.data]
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config in a YAML file, with ``key=value`` overrides (each value read as YAML)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of settings")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like key=value")
        raw[key.strip()] = yaml.safe_load(value)
    return make_config(raw)


def config_help() -> str:
    """Every setting of every trainer with its default and help (``alignpro train --help-config``)."""
    lines = []
    for name, cls in config_classes().items():
        lines.append(f"trainer: {name}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
            lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
