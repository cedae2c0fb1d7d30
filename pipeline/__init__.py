"""kd-cache library: logit store, datasets, models, losses and training-loop parts.

`stages` builds on this package; this package never imports `stages`.
"""

from __future__ import annotations

__version__ = "0.1.0"
