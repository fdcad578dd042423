"""Batched forward passes of several TorchXRayVision models over the same images.

Every image is decoded and preprocessed once (in DataLoader workers, where skimage's resize runs in
parallel) and each batch goes through all models, so three models cost one pass over the files.
"""

import numpy as np
import torch
from tqdm import tqdm

from medleak.errors import MedleakError
from medleak.xrv.preprocess import INPUT_SIZE, load_preprocessed


class ImageFiles(torch.utils.data.Dataset):
    """Preprocessed images `data_root/paths[i]` as float32 tensors (1, size, size)."""

    def __init__(self, data_root, paths, size: int = INPUT_SIZE):
        self.data_root, self.paths, self.size = str(data_root), [str(p) for p in paths], size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return torch.from_numpy(load_preprocessed(self.data_root, self.paths[index], self.size))


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" → the first CUDA GPU if there is one, else the CPU; otherwise a torch device string."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MedleakError(f"--device={name!r} is not a torch device (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedleakError(f"--device={name}: no CUDA GPU is visible to torch; use --device=cpu")
    return device


def model_logits(models: dict, data_root, paths, *, batch_size: int = 32, num_workers: int = 0,
                 device="cpu", desc="inference") -> dict:
    """{name: float32 (n_images, n_outputs)} raw logits of each model on each image.

    `models` maps a name to `(module, output_indices)`: which of the module's outputs to keep.
    """
    if batch_size < 1:
        raise MedleakError(f"--batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ImageFiles(data_root, paths), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda")
    chunks = {name: [] for name in models}
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch"):
            batch = batch.to(device, non_blocking=True)
            for name, (module, keep) in models.items():
                chunks[name].append(module(batch)[:, torch.as_tensor(keep, device=device)].float().cpu().numpy())
    n_outputs = {name: len(keep) for name, (_, keep) in models.items()}
    return {name: np.concatenate(parts) if parts else np.zeros((0, n_outputs[name]), np.float32)
            for name, parts in chunks.items()}
