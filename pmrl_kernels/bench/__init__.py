"""`python -m pmrl_kernels.bench`: PMRL side by side with the published recipe and plain torch, on this machine.

Targets (targets.py, one table): the whole loss, the alignment term alone (reg_weight=0), gram_svd (S and lead)
and the contrastive term. Modes: forward (grad enabled, as in training), backward (the forward runs untimed
first), full (both). Matmul precisions (the loss and contrastive targets): IEEE, TF32, bfloat16 autocast.
Providers (providers.py): the baselines of baseline_code.py (the published recipe, torch.linalg.svd reduced,
torch.linalg.svdvals, the torch composition, the same under torch.compile), every backend of the registry that
runs on the device, and backends with a knob set (VARIANTS). Speedups compare medians measured in the same run.
Loss parameters: pmrl_kernels.config.DEFAULTS.

Modules: cells (what a cell is), baseline_code, targets, providers, timing (one cell's time and memory), sweep
(the cases and the scheduler), report (fields, table, files, plot), summary (legend, headline), machine (where
and what ran), cli (flags and main).
"""
