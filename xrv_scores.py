"""Runs TorchXRayVision's public chest X-ray models on known members and non-members.

    pip install -r requirements-xrv.txt
    python xrv_scores.py --chexpert_root=./data/chexpert --mimic_root=./data/mimic   # or: medleak-xrv-scores …
    python xrv_attack.py

Writes ./logs/torchxrayvision/{chexpert,mimic}/ (layout in docs/XRV.md). Weights are read from
TorchXRayVision's cache folder and never downloaded unless --download is given. Flags: --help
(defined in src/medleak/xrv/cli.py).
"""

from medleak.xrv.cli import scores

if __name__ == "__main__":
    scores()
