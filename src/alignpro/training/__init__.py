"""Training Align-Pro prompters (``alignpro train``), one concept per module:

:mod:`~alignpro.training.config`       each trainer's settings (``--help-config``) and the YAML loading
:mod:`~alignpro.training.data`         prompt data and the train/dev split
:mod:`~alignpro.training.closed_form`  the closed-form trainer (weighted MLE towards rho*) and its checkpoints
:mod:`~alignpro.training.rl`           the RL trainer (TRL GRPO or RLOO)
:mod:`~alignpro.training.pipeline`     the run: data, frozen engine, training, dev evaluation
:mod:`~alignpro.training.artifacts`    what a run leaves: the log, its curves, the adapter's ``alignpro.json``
"""
