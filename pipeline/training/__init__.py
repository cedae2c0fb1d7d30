"""Training: the one loop (`fit`, classifiers and language models), N students at once, devices and
torch.distributed, progress people can read anywhere."""
