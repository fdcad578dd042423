"""Stages 3-4: train shadow models and infer their logits (JAX / flax.linen / optax).

models.py     small_cnn, wrn_<depth>_<width>; create_model(name, num_classes, norm, dtype)
augment.py    on-device augmentation presets and the audit's evaluation views
optim.py      SGD + momentum, decoupled weight decay, warm-up + cosine, EMA
training.py   Trainer (compile once, train many runs), batch schedule / gradient-estimator hooks
inference.py  multi-view logits of every record, test logits
metrics.py    accuracy, macro AUROC, AUROC per subgroup
device.py     configure_device_memory (several workers per GPU), count_compilations
"""
