"""medleak: patient-level membership-inference audits of medical-imaging models."""


def __getattr__(name):
    # `medleak.load_model` without importing JAX on `import medleak`.
    if name == "load_model":
        from medleak.train_utils.saved_model import load_model

        return load_model
    raise AttributeError(f"module 'medleak' has no attribute {name!r}")
