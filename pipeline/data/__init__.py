"""The data a run reads: datasets (kd's own sources and yours), language-model text and tokens,
validation carves, augmentations and their replay, and what is kept between runs (generated data)."""
