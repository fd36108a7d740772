"""clipaudit: membership-inference audits of CLIP models at scale."""

__version__ = "0.1.0"
