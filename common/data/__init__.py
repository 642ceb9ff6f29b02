"""Dataset helpers every task shares: dataset and worker seeding, samplers, folds, the augmentation builder, feature /
image caches, the image check.

May import common.utils, common.cluster, common.models.
"""
