"""The method names, without importing torch: the CLI and the configuration check them before any heavy
import (`kd --help` and a bad setting answer in a fraction of a second). `pipeline.losses.LOSSES` holds
their loss functions, in this order."""

METHODS = ("ce", "kd", "annealing", "continuation", "dkd", "dist")
# Methods that train from labels alone: they run without a logit cache.
LABEL_ONLY = frozenset({"ce"})
