"""Attacks TorchXRayVision's public chest X-ray models using the logits from xrv_scores.py.

    python xrv_scores.py ...          # writes ./logs/torchxrayvision/{chexpert,mimic}/
    python xrv_attack.py              # writes ./figs/torchxrayvision/  (or: medleak-xrv-attack …)

Offline RMIA and offline LiRA of each target model (CheXpert's, MIMIC-CXR's) against the one
reference model (PadChest's). Needs no torch. Outputs are described in docs/XRV.md; flags: --help
(defined in src/medleak/xrv/cli.py).
"""

from medleak.xrv.cli import attack

if __name__ == "__main__":
    attack()
